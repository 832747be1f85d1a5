"""An Olive pass: posrewrite's rewrite as a step of an Olive workflow (``pip install 'posrewrite[olive]'``).

``PosRewrite`` takes the command line's options under their Python names (``rope_scale``, ``rope_method``,
``original_max_positions``, ``rope_base``, ``rope_params``, ``fp32_positions``, ``fuse``, ``max_positions``,
``pos_scale``, ``alibi_scale``, ``extend``, ``window``, ``group_size``, ``leaky``, ``logn_scaling``,
``validate``, ``allow_partial``) and rewrites

- an ONNX model (``ONNXModelHandler`` of a file): the output is one ``.onnx`` file in the pass's output folder;
- an onnxruntime-genai / ModelBuilder output folder (a folder with ``genai_config.json``, as Olive's
  ``ModelBuilder`` pass leaves it): the whole folder is rewritten (model, ``genai_config.json``'s context length,
  weights, tokenizer files), as ``posrewrite FOLDER -o OUT/`` does.

Every rewrite is validated in onnxruntime (unless ``validate: false``) and records what was done in the model's
metadata (see ``posrewrite.provenance``). A posrewrite error (a usage error, no encoding, a failed validation)
stops the pass with that error's message.

Olive finds passes through a package configuration: :func:`package_config` returns Olive's own configuration
with ``PosRewrite`` added, and ``python -m posrewrite.olive package-config -o olive_config.json`` writes it for
``olive run --config workflow.json --package-config olive_config.json``. See docs/olive.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

__all__ = ["PosRewrite", "package_config", "PASS_ENTRY"]

#: the entry this pass needs in an Olive package configuration
PASS_ENTRY: dict[str, Any] = {
    "module_path": "posrewrite.olive.PosRewrite",
    "supported_providers": ["*"],
    "supported_accelerators": ["*"],
    "supported_precisions": ["*"],
    "supported_algorithms": [],
    "supported_quantization_encodings": [],
}

# (name, type, default, description): the RewriteOptions fields the pass takes, as the command line names them
_PARAMS: tuple[tuple[str, Any, Any, str], ...] = (
    ("rope_scale", float, None, "--rope-scale: extend the context this many times"),
    ("rope_method", str, None, "--rope-method: linear (the default with rope_scale), ntk, dynamic, yarn, llama3, "
     "longrope"),
    ("original_max_positions", int, None, "--original-max-positions: the trained context length L"),
    ("rope_base", float, None, "--rope-base: a new RoPE base (theta)"),
    ("rope_params", dict, None, "--rope-params: HF-style rope_parameters (a dict)"),
    ("fp32_positions", bool, False, "--fp32-positions: positions and angles in fp32"),
    ("fuse", str, "none", "--fuse: none, ort (onnxruntime contrib ops) or onnx (opset 23)"),
    ("max_positions", int, None, "--max-positions: table / fused cache rows"),
    ("pos_scale", float, None, "--pos-scale: interpolate learned absolute positions"),
    ("alibi_scale", float, None, "--alibi-scale: scale ALiBi slopes"),
    ("extend", str, None, "--extend: self-extend or rerope"),
    ("window", int, None, "--window: the neighbour window of --extend"),
    ("group_size", int, None, "--group-size: SelfExtend's group size"),
    ("leaky", float, None, "--leaky: Leaky ReRoPE's slope 1/K beyond the window"),
    ("logn_scaling", bool, False, "--logn-scaling: Qwen-1 log-n query scaling"),
    ("no_validate", bool, False, "--no-validate: skip the onnxruntime validation of the rewrite"),
    ("allow_partial", bool, False, "--allow-partial: rewrite the understood sites when others are not"),
)


class PosRewrite(Pass):
    """Rescale, extend, make fp32-safe or fuse the positional encodings of an ONNX model or a genai folder."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            name: PassConfigParam(type_=kind if default is not None else (kind | None), default_value=default,
                                  description=text)
            for name, kind, default, text in _PARAMS
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        from posrewrite import api
        from posrewrite.options import options_from_flags

        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"PosRewrite takes an ONNX model, not {type(model).__name__}")
        flags = {name: getattr(config, name) for name, *_ in _PARAMS}
        flags["validate"] = not flags.pop("no_validate")
        rope_params = flags.pop("rope_params")
        if rope_params:
            flags["rope_params"] = json.dumps(rope_params)
        source = Path(model.model_path)
        folder = source.parent
        out = Path(output_model_path)
        if out.suffix == ".onnx":
            out = out.with_suffix("")
        if (folder / "genai_config.json").is_file():  # a ModelBuilder / onnxruntime-genai folder: rewrite it whole
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # posrewrite writes the folder beside and renames it into place
            options = options_from_flags(flags | {"output": out})
            api.rewrite(folder, options)
            attributes = dict(model.model_attributes or {})
            keep = {source.name, f"{source.name}.data"}
            attributes["additional_files"] = sorted(str(p) for p in out.iterdir() if p.name not in keep
                                                    and not p.name.endswith((".onnx", ".onnx.data")))
            return ONNXModelHandler(str(out), onnx_file_name=source.name, model_attributes=attributes or None)
        out.mkdir(parents=True, exist_ok=True)
        target = out / source.name
        options = options_from_flags(flags | {"output": target})
        api.rewrite(source, options)
        return ONNXModelHandler(str(target), model_attributes=model.model_attributes)


def package_config() -> dict[str, Any]:
    """Olive's own package configuration with ``PosRewrite`` added (``--package-config`` replaces Olive's, so the
    built-in passes such as ModelBuilder must stay in it)."""
    from olive.package_config import OlivePackageConfig

    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config.setdefault("passes", {})["PosRewrite"] = dict(PASS_ENTRY)
    return config


def main(argv: list[str] | None = None) -> int:
    """``python -m posrewrite.olive package-config [-o FILE]``: write the package configuration."""
    parser = argparse.ArgumentParser(prog="python -m posrewrite.olive")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("package-config", help="Olive's package configuration with the PosRewrite pass added")
    p.add_argument("-o", "--output", type=Path, help="write it here (default: stdout)")
    args = parser.parse_args(argv)
    text = json.dumps(package_config(), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
