"""Image references as the kubelet checks them: InvalidImageName, the `.invalid` pull errors, default commands."""

from __future__ import annotations

import re

from finetune_testbed.podrunner.common import IMAGE_ENTRYPOINTS

# The image reference grammar of distribution/reference (what the kubelet parses).
_REF_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"

_REF_DOMAIN = re.compile(rf"{_REF_DOMAIN_COMPONENT}(?:\.{_REF_DOMAIN_COMPONENT})*(?::[0-9]+)?")

_REF_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")

_REF_TAG = re.compile(r"[\w][\w.-]{0,127}")

_REF_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")

def image_name_error(image: str) -> str | None:
    """The kubelet's InvalidImageName message when `image` is no valid reference, else None."""
    head = f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": invalid reference format'
    name, _, digest = image.partition("@")
    if digest and not _REF_DIGEST.fullmatch(digest):
        return head
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _REF_TAG.fullmatch(tag):
            return head
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = "docker.io", name if sep else f"library/{name}"
    else:
        domain, path = first, rest
    if not name or len(name) > 255 or not _REF_DOMAIN.fullmatch(domain):
        return head
    components = path.split("/")
    if all(_REF_PATH_COMPONENT.fullmatch(c) for c in components):
        return None
    if all(_REF_PATH_COMPONENT.fullmatch(c.lower()) for c in components):
        return f"{head}: repository name ({path}) must be lowercase"
    return head


def image_pull_error(image: str) -> str | None:
    host = image.split("/", 1)[0] if "/" in image else ""
    if host.split(":", 1)[0].endswith(".invalid"):
        return f'failed to pull image "{image}": registry {host} cannot be resolved (local pod runner)'
    return None


def default_command(image: str) -> list[str]:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return list(IMAGE_ENTRYPOINTS.get(name, []))
