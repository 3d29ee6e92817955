"""Checkpoint files of a compiled model hold the model's own keys, and load back into a compiled or plain one."""

import torch
from accelerate import Accelerator

from clipforge.train.checkpoint import unpack_state
from clipforge.train.loop import TrainProgress
from clipforge.train.state import MODEL, plain_module, restore_state, state_files


def test_a_compiled_model_checkpoints_under_its_own_keys():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters())
    prepared, optimizer = accelerator.prepare(model, optimizer)
    compiled = torch.compile(prepared, backend="eager")  # the wrapper, not the code generation, is under test
    compiled(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert plain_module(accelerator, compiled) is model

    files = state_files(accelerator, compiled, optimizer, TrainProgress(step=1), {"lr": 1.0})
    weights = unpack_state(files[MODEL])
    assert weights.keys() == model.state_dict().keys() == {"0.weight", "0.bias", "1.weight", "1.bias"}

    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin_optimizer = torch.optim.AdamW(twin.parameters())
    progress = restore_state(accelerator, torch.compile(twin, backend="eager"), twin_optimizer, files, reseed=0)
    assert progress.step == 1
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values(), strict=True))
