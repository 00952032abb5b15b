"""The wheel carries the .proto files beside the code generated from them (cachepoint/v1/), so gRPC tools
and other languages' clients can be built from an installed cachepoint. They are copied from proto/ when
the wheel is built rather than kept twice in the tree. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOS = Path(__file__).resolve().parent / "proto" / "cachepoint" / "v1"


class BuildWithProtos(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the tree: nothing to copy
            return
        target = Path(self.build_lib) / "cachepoint" / "v1"
        target.mkdir(parents=True, exist_ok=True)
        for proto in sorted(PROTOS.glob("*.proto")):
            self.copy_file(str(proto), str(target / proto.name))


setup(cmdclass={"build_py": BuildWithProtos})
