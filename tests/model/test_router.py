"""The Router module: shapes, kinds, dtype handling and the EXECUTE/SKIP convention."""
import pytest
import torch

from skipgpt.router import Router


@pytest.mark.parametrize("kind, keys", [
    ("linear", {"weight_predictor.weight", "weight_predictor.bias"}),
    ("mlp", {"weight_predictor.0.weight", "weight_predictor.0.bias",
             "weight_predictor.2.weight", "weight_predictor.2.bias"}),
])
def test_state_dict_keys_and_shapes(kind, keys):
    router = Router(64, kind)
    assert set(router.state_dict()) == keys
    if kind == "mlp":
        assert router.weight_predictor[0].weight.shape == (16, 64)
        assert router.weight_predictor[2].weight.shape == (2, 16)
    x = torch.randn(3, 5, 64)
    assert router(x).shape == (3, 5, 2)
    assert router.execute(x).shape == (3, 5)
    assert router.execute(x).dtype == torch.bool


def test_computes_in_own_dtype():
    torch.manual_seed(0)
    router = Router(32, dtype=torch.float32)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    logits = router(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ router.weight_predictor.weight.T
                               + router.weight_predictor.bias)


def test_index_zero_executes_and_tie_executes():
    router = Router(4)
    with torch.no_grad():
        router.weight_predictor.weight.zero_()
        router.weight_predictor.weight[1, 0] = 1.0  # SKIP logit = x[0]
        router.weight_predictor.bias.zero_()
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    assert router.execute(x).tolist() == [False, True, True]  # skip, execute, tie -> execute


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        Router(64, "conv")
    with pytest.raises(ValueError, match="hidden_size"):
        Router(0)
