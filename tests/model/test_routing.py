import torch

from skipgpt.routing import forced_skip_mask


def test_forced_routes_have_the_rate_and_look_independent():
    skip = forced_skip_mask(seed=0, layer_idx=3, batch=8, slots=torch.arange(8192), rate=0.25)
    assert skip.shape == (2, 8, 8192)
    rate = skip.float().mean().item()
    assert abs(rate - 0.25) < 0.01
    # Neighbouring tokens, the two modules and two sequences agree as often as independent
    # coin flips would: 0.75^2 + 0.25^2 = 0.625 and 0.25^2 = 0.0625.
    assert abs(skip[:, :, 1:].eq(skip[:, :, :-1]).float().mean().item() - 0.625) < 0.01
    assert abs((skip[0] & skip[1]).float().mean().item() - 0.0625) < 0.005
    assert abs((skip[:, 0] & skip[:, 1]).float().mean().item() - 0.0625) < 0.007


def test_forced_routes_depend_on_seed_layer_and_slot_only():
    slots = torch.arange(100, 164)
    a = forced_skip_mask(1, 2, 3, slots, 0.5)
    assert torch.equal(a, forced_skip_mask(1, 2, 3, slots, 0.5))
    assert not torch.equal(a, forced_skip_mask(2, 2, 3, slots, 0.5))
    assert not torch.equal(a, forced_skip_mask(1, 5, 3, slots, 0.5))
    # A decode step sees the same decision as the full forward at that slot.
    assert torch.equal(a[:, :, 10:11], forced_skip_mask(1, 2, 3, slots[10:11], 0.5))
    assert not forced_skip_mask(1, 2, 3, slots, 0.0).any()
    assert forced_skip_mask(1, 2, 3, slots, 1.0).all()
