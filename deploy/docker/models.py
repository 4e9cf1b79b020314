#!/usr/bin/env python3
"""Build-stage helper of deploy/Dockerfile.cuda (standard library only).

  models.py check-export STAMP KIND          the export models/<file> matches the sha256 that
                                             scripts/export_minilm.py recorded in STAMP
  models.py extract-ort-gpu DIR VERSION OUT  unpack the onnxruntime-gpu wheel's library and its
                                             CUDA provider from DIR into OUT

Exits non-zero, naming the file and the fix, when something is missing or does not match.
"""

import hashlib
import json
import pathlib
import sys
import zipfile

LIBRARIES = ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so")


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export(stamp_path: str, kind: str) -> None:
    stamp_file = pathlib.Path(stamp_path)
    if not stamp_file.exists():
        sys.exit(f"error: {stamp_file} not found: run `make models-gpu` before building the CUDA image")
    record = json.loads(stamp_file.read_text()).get(kind)
    if not record:
        sys.exit(f"error: {stamp_file} has no {kind} export: run `make models-gpu`")
    model = stamp_file.parent / record["file"]
    if not model.exists():
        sys.exit(f"error: {model} not found: run `make models-gpu`")
    actual = sha256(model)
    if actual != record["sha256"]:
        sys.exit(f"error: {model} has sha256 {actual}, {stamp_file} records {record['sha256']}: run `make models-gpu`")
    print(f"{model} ok (min cosine {record.get('min_cosine')} against the int8 model)")


def extract_ort_gpu(wheel_dir: str, version: str, out: str) -> None:
    wheels = sorted(pathlib.Path(wheel_dir).glob(f"onnxruntime_gpu-{version}-*.whl"))
    if not wheels:
        sys.exit(f"error: no onnxruntime_gpu-{version}-*.whl in {wheel_dir}")
    wanted = (f"libonnxruntime.so.{version}",) + LIBRARIES
    target = pathlib.Path(out)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as archive:
        for name in wanted:
            member = f"onnxruntime/capi/{name}"
            try:
                info = archive.getinfo(member)
            except KeyError:
                sys.exit(f"error: {wheels[0].name} has no {member}")
            with archive.open(info) as source, (target / name).open("wb") as sink:
                while block := source.read(1 << 20):
                    sink.write(block)
            print(f"{target / name} ({info.file_size} bytes)")


def main() -> None:
    match sys.argv[1:]:
        case ["check-export", stamp, kind]:
            check_export(stamp, kind)
        case ["extract-ort-gpu", wheel_dir, version, out]:
            extract_ort_gpu(wheel_dir, version, out)
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main()
