"""Attention across several devices.

- heads.py: head-parallel attention inside one process (the `head_parallel` backend):
  one call's heads split across the GPUs of this machine.
- ulysses.py: sequence-parallel (Ulysses) attention for multi-process setups: an
  all-to-all over a torch.distributed process group around any local kernel of ours.
- cost.py: the transfer + kernel cost model that decides whether a split pays.
- topology.py: the GPUs and their links (peer access, nvidia-smi topo, timed copies).
"""
