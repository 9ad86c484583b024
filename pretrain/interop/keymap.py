"""Renaming state-dict keys between our models and other libraries' by regex rules, and reading
fairseq's conv-spec strings.

Every library keeps attention's q/k/v projections apart where we fuse them into one
`qkv_proj`, so both directions also split or join those.
"""

from __future__ import annotations

import ast
import re

import torch

#: our fused attention projection
QKV_KEY = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)")


def rename_from(state: dict[str, torch.Tensor], rules: list[tuple[re.Pattern, str]], qkv: re.Pattern,
                library: str) -> dict[str, torch.Tensor]:
    """Their keys -> ours. `rules`: (regex on their key, our name with `{}` per group); `qkv`
    matches their separate projections with groups (layer, q|k|v, weight|bias). Unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = qkv.fullmatch(key)
        if m:
            layer, name, kind = m.groups()
            parts.setdefault((layer, kind), {})[name] = value
            continue
        for regex, ours in rules:
            m = regex.fullmatch(key)
            if m:
                out[ours.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"{library} parameter {key!r} has no counterpart in our wav2vec 2.0 / data2vec models")
    for (layer, kind), p in parts.items():
        out[f"encoder.layers.{layer}.self_attn.qkv_proj.{kind}"] = torch.cat([p["q"], p["k"], p["v"]])
    return out


def split_qkv(key: str, value: torch.Tensor, template: str) -> dict[str, torch.Tensor] | None:
    """Our fused projection as three tensors named by `template` (fields: layer, name q|k|v, kind);
    None when `key` is not a fused projection."""
    m = QKV_KEY.fullmatch(key)
    if not m:
        return None
    layer, kind = m.groups()
    return {template.format(layer=layer, name=name, kind=kind): part.clone()
            for name, part in zip("qkv", value.chunk(3, dim=0))}


def eval_conv(text: str) -> list:
    """fairseq's `conv_feature_layers` string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...", evaluated
    with nothing but list arithmetic allowed."""
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Add, ast.Mult, ast.List, ast.Tuple, ast.Constant, ast.Load)
    if not all(isinstance(node, allowed) for node in ast.walk(tree)):
        raise ValueError(f"conv_feature_layers {text!r} is not a list expression")
    return eval(compile(tree, "<conv_feature_layers>", "eval"), {"__builtins__": {}})  # noqa: S307 - checked above
