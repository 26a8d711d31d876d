"""What each rank does at start-up anyway, done once in the ranks' forkserver (tests/distributed.py): DeepSpeed
imports its Muon optimizer (which imports torch's compiler, ~1 s) the first time a ZeRO engine checks its
optimizer, and probes which of its ops this machine can build (compiler subprocesses, ~0.4 s) when it joins
the process group; the first compiled Muon step has torch's compiler check which vector instruction sets load
here (a compile and a subprocess each, ~1.3 s). None of it runs a torch op or leaves a thread, so forking
afterwards stays safe."""
import deepspeed.ops
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
from torch._inductor import cpu_vec_isa

assert isinstance(deepspeed.ops.__compatible_ops__, dict)  # probed here, cached in the module
cpu_vec_isa.valid_vec_isa_list()  # functools.cache: the forked ranks inherit the answer
