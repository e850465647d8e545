"""Readers and validators for the on-disk formats: safetensors, HF checkpoints, PEFT adapters.

Everything here works on header bytes, JSON and file names only; no tensor data is read and no
tensor math is done. Every problem becomes a :class:`streammerge.errors.StreamMergeError` whose
message names the file and the tensor.
"""
