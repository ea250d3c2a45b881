"""Starts N processes of one JAX program on this machine, as one cluster.

Each process gets LOCAL_DEVICES simulated CPU devices (XLA_FLAGS) and the
same coordinator port on 127.0.0.1; its output goes to a log file, so that
no pipe fills up while the test waits.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
N_PROCESSES = 2
LOCAL_DEVICES = 4
# What a worker prints, with this exit status, when this jaxlib cannot run
# CPU collectives across processes.
GLOO_UNAVAILABLE = 3
GLOO_UNAVAILABLE_MESSAGE = "gloo unavailable"


def free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET,
                                        socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(local_devices: int = LOCAL_DEVICES) -> dict[str, str]:
  """This process's environment, with `local_devices` CPU devices."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={local_devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH")) if p)
  # JAX warns that proxy variables can hang jax.distributed.initialize; the
  # traffic here is to 127.0.0.1 only.
  for key in list(env):
    if key.lower().endswith("_proxy"):
      del env[key]
  return env


class Processes:
  """`n` processes; `command(i, port)` is the argv of process i."""

  def __init__(self, name: str, log_dir: str,
               command: Callable[[int, int], Sequence[str]],
               n: int = N_PROCESSES):
    port = free_port()
    self.logs = [os.path.join(log_dir, f"log_{name}_{i}.txt")
                 for i in range(n)]
    self.procs = []
    env = process_env()
    for i in range(n):
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, *command(i, port)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        ))

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.kill()

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def tails(self) -> str:
    return "\n".join(f"--- process {i} ---\n{self.log(i)[-3000:]}"
                     for i in range(len(self.procs)))

  def skip_if_gloo_unavailable(self) -> None:
    if any(p.poll() == GLOO_UNAVAILABLE for p in self.procs):
      self.kill()
      reason = re.search(GLOO_UNAVAILABLE_MESSAGE + ".*", self.tails())
      pytest.skip(reason.group(0) if reason else GLOO_UNAVAILABLE_MESSAGE)

  def wait(self, timeout: float) -> list[int]:
    """Exit codes; fails (killing them all) if any runs past `timeout`."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in self.procs:
      try:
        codes.append(proc.wait(max(deadline - time.monotonic(), 0.1)))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f"processes still running after {timeout} s:\n"
                    + self.tails())
    self.skip_if_gloo_unavailable()
    return codes

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def workers(mode: str, out: str, *args: str) -> Processes:
  """multiprocess_worker.py MODE in N_PROCESSES processes."""
  return Processes(mode, out, lambda i, port: [
      os.path.join(HERE, "multiprocess_worker.py"), mode,
      "--process-id", str(i), "--num-processes", str(N_PROCESSES),
      "--port", str(port), "--out", out, *args,
  ])


def gloo_unavailable_reason(out: str, timeout: float) -> Optional[str]:
  """Why processes cannot run CPU collectives together here, or None."""
  with workers("probe", out) as procs:
    for proc in procs.procs:
      try:
        proc.wait(timeout)
      except subprocess.TimeoutExpired:
        return None
    found = re.search(GLOO_UNAVAILABLE_MESSAGE + ".*", procs.tails())
  return found.group(0) if found else None
