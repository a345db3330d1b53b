"""``python -m fastbn demo`` (fastbn.demo): a short run, one-at-a-time inference, gradients.

The runs need the demo extras (scikit-learn, matplotlib, tqdm) and are skipped without them;
the gradient checks of the demo's hand-written network need NumPy alone.
"""

import argparse
import sys

import numpy as np
import pytest

from fastbn import demo


def parse(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def require_extras(plot=True):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    if plot:
        pytest.importorskip("matplotlib")


# ---------------------------------------------------------------------------- the CLI


def test_defaults():
    args = parse([])
    assert (args.epochs, args.lr, args.seed, args.no_plot) == (
        demo.DEFAULT_EPOCHS, demo.DEFAULT_LR, 0, False)


def test_short_run_reaches_the_goal_and_saves_the_plot(tmp_path, monkeypatch, capsys):
    require_extras()
    monkeypatch.chdir(tmp_path)
    assert demo.run(parse(["--epochs", "3"])) == 0
    output = capsys.readouterr().out
    assert "with BatchNorm" in output and "without BatchNorm" in output
    assert "predictions: 450 of 450 equal batched eval" in output
    assert "µs per BatchNorm call" in output
    assert (tmp_path / demo.PLOT_FILENAME).stat().st_size > 0
    assert str(tmp_path / demo.PLOT_FILENAME) in output


def test_no_plot_writes_nothing(tmp_path, monkeypatch, capsys):
    require_extras(plot=False)
    monkeypatch.chdir(tmp_path)
    demo.run(parse(["--epochs", "1", "--no-plot"]))
    assert list(tmp_path.iterdir()) == []
    assert "training curves" not in capsys.readouterr().out


def test_missing_the_accuracy_goal_fails(tmp_path, monkeypatch, capsys):
    require_extras(plot=False)
    monkeypatch.chdir(tmp_path)
    assert demo.run(parse(["--epochs", "1", "--lr", "1e-5", "--no-plot"])) == 1
    assert "FAILED: test accuracy with BatchNorm" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "0"], ["--lr", "nan"],
                                  ["--seed", "-1"], ["--seed", str(2**32)]])
def test_bad_options_exit_with_a_message(argv):
    with pytest.raises(SystemExit, match="fastbn demo: --"):
        demo.run(parse(argv))


@pytest.mark.parametrize("module", ["sklearn", "tqdm", "matplotlib"])
def test_missing_extra_says_how_to_install_it(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(SystemExit, match=r'pip install "fastbn\[demo\]"'):
        demo.run(parse(["--epochs", "1"]))


# ---------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def trained():
    """A batch-norm network trained for two epochs, and the test images."""
    require_extras(plot=False)
    data = demo.load_digits(seed=1)
    x_train, x_test, _, _ = data
    model = demo.MLP((x_train.shape[1], 32, 32, 10), batch_norm=True,
                     rng=np.random.default_rng(1))
    network = demo.Network("with BatchNorm", model, demo.SGD(model, lr=0.1))
    demo.train([network], data, epochs=2, rng=np.random.default_rng(1), report=lambda epoch: None)
    return model, x_test


def test_one_at_a_time_predictions_equal_batched(trained):
    model, x_test = trained
    batched = model.eval().predict(x_test)
    single, seconds_per_example = demo.predict_one_at_a_time(model, x_test)
    np.testing.assert_array_equal(single, batched)
    assert seconds_per_example > 0
    # An example as a (1, features) batch gives the same label too.
    rows = np.concatenate([model.predict(x_test[i:i + 1]) for i in range(len(x_test))])
    np.testing.assert_array_equal(rows, batched)


def test_batch_norm_one_at_a_time_is_bit_identical(trained):
    model, x_test = trained
    seconds_per_call, identical = demo.batch_norm_one_at_a_time(model, x_test[:50], repeats=1)
    assert identical
    assert seconds_per_call > 0


# ---------------------------------------------------------------------- gradients


def numerical_gradient(loss, array, step=1e-6):
    """Central differences of ``loss()`` with respect to every element of ``array``."""
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        plus = loss()
        array[index] = saved - step
        minus = loss()
        array[index] = saved
        gradient[index] = (plus - minus) / (2 * step)
    return gradient


@pytest.mark.parametrize("batch_norm", [True, False], ids=["with-bn", "without-bn"])
def test_backward_matches_finite_differences(batch_norm):
    rng = np.random.default_rng(3)
    model = demo.MLP((5, 6, 4, 3), batch_norm=batch_norm, rng=rng, dtype=np.float64)
    for bn in model.batch_norms:  # away from the initial ones and zeros
        bn.weight[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.bias[...] = rng.normal(size=bn.num_features)
    x = rng.normal(size=(7, 5))
    labels = rng.integers(0, 3, size=7)

    def loss():
        return demo.softmax_cross_entropy(model(x), labels)[0]

    _, grad_logits = demo.softmax_cross_entropy(model(x), labels)
    grad_x = model.backward(grad_logits)
    analytic = {(type(layer).__name__, i, name): getattr(layer, "grad_" + name).copy()
                for i, (layer, name) in enumerate(model.parameters())}
    for i, (layer, name) in enumerate(model.parameters()):
        key = (type(layer).__name__, i, name)
        np.testing.assert_allclose(analytic[key], numerical_gradient(loss, getattr(layer, name)),
                                   rtol=1e-5, atol=1e-8, err_msg=f"gradient of {key}")
    np.testing.assert_allclose(grad_x, numerical_gradient(loss, x), rtol=1e-5, atol=1e-8,
                               err_msg="gradient of the input")
    assert len(model.batch_norms) == (2 if batch_norm else 0)


def test_sgd_updates_batch_norm_parameters_in_place():
    rng = np.random.default_rng(4)
    model = demo.MLP((3, 4, 2), batch_norm=True, rng=rng)
    (bn,) = model.batch_norms
    weight = bn.weight
    _, grad_logits = demo.softmax_cross_entropy(model(rng.normal(size=(8, 3)).astype(np.float32)),
                                                np.array([0, 1] * 4))
    model.backward(grad_logits)
    demo.SGD(model, lr=0.1).step()
    assert bn.weight is weight
    np.testing.assert_allclose(weight, 1 - 0.1 * bn.grad_weight, rtol=1e-6)
