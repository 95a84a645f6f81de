import torch

from skipgpt.routing import forced_params, forced_skip_mask


def test_forced_routes_have_the_rate_and_look_independent():
    skip = forced_skip_mask(forced_params(0, 0.25, 'cpu'), layer_idx=3, batch=8, slots=torch.arange(8192))
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
    half = forced_params(1, 0.5, "cpu")
    a = forced_skip_mask(half, 2, 3, slots)
    assert torch.equal(a, forced_skip_mask(half, 2, 3, slots))
    assert not torch.equal(a, forced_skip_mask(forced_params(2, 0.5, "cpu"), 2, 3, slots))
    assert not torch.equal(a, forced_skip_mask(half, 5, 3, slots))
    # A decode step sees the same decision as the full forward at that slot.
    assert torch.equal(a[:, :, 10:11], forced_skip_mask(half, 2, 3, slots[10:11]))
    assert not forced_skip_mask(forced_params(1, 0.0, "cpu"), 2, 3, slots).any()
    assert forced_skip_mask(forced_params(1, 1.0, "cpu"), 2, 3, slots).all()
