"""Build hook: generate the CSI gRPC stubs from proto/csi.proto into csi/_proto/.

protoc's path mapping (-Icsi/_proto=proto) makes the generated modules import each
other as ``csi._proto.csi_pb2``, so no sys.path or sed tricks are needed.
"""

from __future__ import annotations

import os
from typing import Any

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement

    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto = os.path.join(HERE, "proto")
    out = HERE
    args = [
        "grpc_tools.protoc",
        f"-Icsi/_proto={proto}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        "csi/_proto/csi.proto",
    ]
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed to generate the CSI stubs")
    finally:
        os.chdir(cwd)


class GenerateProto(Command):
    description = "generate csi/_proto/csi_pb2*.py from proto/csi.proto"
    user_options: list[Any] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs()


class BuildPy(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPy, "generate_proto": GenerateProto})
