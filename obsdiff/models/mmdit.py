"""What SD3 and Flux share: the MMDiT joint-attention block (an image and a text stream with joint heads).

SD3's `JointTransformerBlock` and Flux's double `FluxTransformerBlock` use the same module names; the
entries a block lacks (SD3.5's dual attention `attn2`, the text stream of SD3's context_pre_only last
block) are skipped by `present_groups` and by `structure_groups` alike.
"""

from __future__ import annotations

from obsdiff.models.registry import Block, Slice, StructureGroup

# Forward order inside the block; each tuple is a set of linears reading one tensor.
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("attn.to_q", "attn.to_k", "attn.to_v"),  # norm1(hidden_states)
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),  # norm1_context(encoder_hidden_states)
    ("attn.to_out.0",),  # joint attention output, image tokens
    ("attn.to_add_out",),  # joint attention output, text tokens
    ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5 dual attention: second adaLN output
    ("attn2.to_out.0",),
    ("ff.net.0.proj",),
    ("ff.net.2",),
    ("ff_context.net.0.proj",),
    ("ff_context.net.2",),
)


def structure_groups(block: Block) -> list[StructureGroup]:
    """Joint heads (image and text streams share them), the image FFN, the text FFN.

    In SD3's context_pre_only last block the text stream's attention output is discarded, so its
    add_q/k/v rows still belong to the heads (q and k feed the joint softmax) but there is no to_add_out
    reader and no text FFN. SD3.5's dual attention `attn2` has heads of its own.
    """
    mods = dict(block.module.named_modules())
    p = block.name + "."
    groups = []
    for attn_name in ("attn", "attn2"):
        attn = mods.get(attn_name)
        if attn is None:
            continue
        head_dim = attn.to_q.out_features // attn.heads
        readers = [Slice(p + f"{attn_name}.to_out.0")]
        writers = [Slice(p + f"{attn_name}.to_{x}") for x in "qkv"]
        if getattr(attn, "add_q_proj", None) is not None:
            writers += [Slice(p + f"{attn_name}.add_{x}_proj") for x in "qkv"]
        if getattr(attn, "to_add_out", None) is not None:
            readers.append(Slice(p + f"{attn_name}.to_add_out"))
        groups.append(StructureGroup("heads", p + attn_name, attn.heads, head_dim, tuple(readers), tuple(writers),
                                     attention=p + attn_name))
    for ff_name in ("ff", "ff_context"):
        ff = mods.get(ff_name)
        if ff is None:
            continue
        groups.append(StructureGroup("ffn", p + ff_name, ff.net[0].proj.out_features, 1,
                                     (Slice(p + f"{ff_name}.net.2"),), (Slice(p + f"{ff_name}.net.0.proj"),)))
    return groups


def next_block_inputs(output, inputs: dict) -> dict:
    """MMDiT blocks (SD3, Flux double and single) return (encoder_hidden_states, hidden_states) and the model
    feeds both straight into the next block with the same temb, rotary embedding and attention kwargs.
    SD3's context_pre_only last block returns None for the text stream: nothing reads it after that."""
    encoder_hidden_states, hidden_states = output
    return inputs | {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states}
