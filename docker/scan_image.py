"""Check that an image holds no private key and no password for root, in any layer.

    docker save IMAGE | python3 docker/scan_image.py      (podman save works the same)

Reads the image archive from stdin and looks at every file of every layer, not just the
final file system: a secret deleted by a later layer is still in the image. Fails (exit 1,
listing each finding) on
  - a file holding a PEM or OpenSSH private key (a "-----BEGIN ... PRIVATE KEY-----" block;
    compiled programs and libraries excepted),
  - an ssh host key file (etc/ssh/ssh_host_*_key) even when empty or unreadable as text,
  - an etc/shadow whose root entry has a password hash or an empty password.
Standard library only, streaming: the archive is never written to disk.
"""
from __future__ import annotations

import re
import sys
import tarfile
from typing import IO, List

# A whole key: the BEGIN line, base64 lines (and PEM headers such as Proc-Type), the END
# line. Programs that read keys (ssh, TLS libraries) hold the BEGIN line alone as a string.
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\r?\n"
                         rb"[A-Za-z0-9+/=:,\- \r\n]{40,20000}?"
                         rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
ELF_MAGIC = b"\x7fELF"
HOST_KEY = re.compile(r"(^|/)etc/ssh/ssh_host_[a-z0-9]+_key$")
CHUNK = 1 << 20
OVERLAP = 24 << 10  # longer than any key, so one split across two chunks is still found


def has_private_key(stream: IO[bytes]) -> bool:
    """Whether the file holds a private key block. Compiled programs and libraries are not
    key files and are skipped: some embed published test keys (GnuTLS's FIPS self-tests)."""
    tail = stream.read(len(ELF_MAGIC))
    if tail == ELF_MAGIC:
        return False
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return False
        if PRIVATE_KEY.search(tail + chunk):
            return True
        tail = chunk[-OVERLAP:]


def root_password_problem(shadow: bytes) -> str:
    """Why root's shadow entry allows a password ('' when it does not)."""
    for line in shadow.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1:
            if fields[1] == "":
                return "root has an empty password"
            if "$" in fields[1]:  # a crypt hash, locked ("!" prefix) or not
                return "root has a password hash"
    return ""


def scan_layer(tar: tarfile.TarFile, layer_name: str, findings: List[str]) -> int:
    files = 0
    with tar:
        for member in tar:
            path = member.name.lstrip("./")
            if HOST_KEY.search(path):
                findings.append(f"{layer_name}: ssh host key {path}")
            if not member.isfile():
                continue
            files += 1
            data = tar.extractfile(member)
            if path == "etc/shadow":
                problem = root_password_problem(data.read())
                if problem:
                    findings.append(f"{layer_name}: {path}: {problem}")
            elif has_private_key(data):
                findings.append(f"{layer_name}: private key in {path}")
    return files


def main() -> int:
    findings: List[str] = []
    layers = files = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
        for member in archive:
            # Layers are the members that are tar archives themselves (<id>/layer.tar,
            # <digest>.tar, or OCI's blobs/sha256/<digest>, possibly compressed); the
            # others (manifests, configs) are JSON.
            if not member.isfile():
                continue
            try:
                layer = tarfile.open(fileobj=archive.extractfile(member), mode="r|*")
            except tarfile.TarError:
                continue
            layers += 1
            files += scan_layer(layer, member.name, findings)
    if layers == 0:
        print("scan_image: no layer found on stdin (expected `docker save IMAGE` output)", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"scan_image: FOUND {finding}", file=sys.stderr)
    verdict = "FAILED" if findings else "ok"
    print(f"scan_image: {verdict}: {layers} layers, {files} files scanned for private keys, "
          f"ssh host keys and a root password", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
