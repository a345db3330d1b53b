"""Demo: a small network on real data, trained with fastbn.BatchNorm and without.

Run ``python -m fastbn demo`` (``--help`` for the options). It trains two small NumPy
networks on scikit-learn's bundled handwritten digits (8x8 images, 10 classes, no download),
side by side on the same mini-batches from the same initial weights: one with
:class:`fastbn.BatchNorm` layers,

    Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear -> softmax

and one without. The default learning rate is high enough that the network without batch
norm trains badly, while the one with it does not (at a low rate both train well). Then the
batch-norm network, in eval mode, classifies the test set one example at a time, as an
inference service would; the predictions must equal batched eval exactly.

Needs the ``demo`` extras: ``pip install "fastbn[demo]"`` (scikit-learn, matplotlib, tqdm).
Everything else is NumPy: the layers, their manual backward passes, plain SGD with momentum.
"""

import importlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

import fastbn

DTYPE = np.float32
HIDDEN_FEATURES = (64, 64)
BATCH_SIZE = 64
TEST_FRACTION = 0.25
MOMENTUM = 0.9
DEFAULT_EPOCHS = 20
DEFAULT_LR = 0.2
ACCURACY_GOAL = 0.90
PLOT_FILENAME = "fastbn_demo.png"


def _import_extra(name):
    """Import one of the demo's optional dependencies, or exit saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SystemExit(
            f"fastbn demo needs {name.split('.')[0]}, one of the demo extras: "
            'pip install "fastbn[demo]"'
        ) from None


def _check_extras(plot):
    """Exit before any work if a demo extra is missing, rather than after training."""
    for name in ("sklearn", "tqdm") + (("matplotlib",) if plot else ()):
        _import_extra(name)


# ---------------------------------------------------------------------------- layers


class Linear:
    """``y = x @ weight.T + bias``, with PyTorch's (out, in) weight and He initialization.

    Works on a batch (N, in) and on one example (in,). Like :class:`fastbn.BatchNorm`, it
    keeps its forward input for :meth:`backward`, which sets ``grad_weight`` and ``grad_bias``.
    """

    def __init__(self, in_features, out_features, rng, dtype=DTYPE):
        scale = math.sqrt(2.0 / in_features)  # He: keeps the activations' scale through ReLU
        self.weight = (rng.standard_normal((out_features, in_features)) * scale).astype(dtype)
        self.bias = np.zeros(out_features, dtype)
        self.grad_weight = self.grad_bias = None
        self._x = None

    def __call__(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, grad_out):
        self.grad_weight = grad_out.T @ self._x
        self.grad_bias = grad_out.sum(axis=0)
        return grad_out @ self.weight


class ReLU:
    """``max(x, 0)``; backward passes the gradient where the input was positive."""

    def __call__(self, x):
        self._positive = x > 0
        return np.where(self._positive, x, 0)

    def backward(self, grad_out):
        return np.where(self._positive, grad_out, 0)


class MLP:
    """A multilayer perceptron: Linear, [BatchNorm,] ReLU per hidden layer, then Linear.

    Parameters
    ----------
    sizes : sequence of int
        Input features, hidden widths, classes: ``(64, 64, 64, 10)`` has two hidden layers.
    batch_norm : bool
        Whether a :class:`fastbn.BatchNorm` follows each hidden Linear layer.
    rng : numpy.random.Generator
        Draws the initial weights; two networks built from equally seeded generators start
        with the same Linear weights, with or without batch norm.
    dtype : numpy.float32 or numpy.float64
    """

    def __init__(self, sizes, *, batch_norm, rng, dtype=DTYPE):
        self.layers = []
        for in_features, out_features in itertools.pairwise(sizes[:-1]):
            self.layers.append(Linear(in_features, out_features, rng, dtype))
            if batch_norm:
                self.layers.append(fastbn.BatchNorm(out_features, dtype=dtype))
            self.layers.append(ReLU())
        self.layers.append(Linear(sizes[-2], sizes[-1], rng, dtype))

    @property
    def batch_norms(self):
        return [layer for layer in self.layers if isinstance(layer, fastbn.BatchNorm)]

    def train(self):
        """Training mode: batch norm uses batch statistics and updates its running ones."""
        for bn in self.batch_norms:
            bn.train()
        return self

    def eval(self):
        """Eval mode: batch norm uses its running statistics, so examples are independent."""
        for bn in self.batch_norms:
            bn.eval()
        return self

    def __call__(self, x):
        """The logits of a batch (N, features) or of one example (features,)."""
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad_logits):
        """Backpropagate through the last forward call; sets every layer's gradients."""
        for layer in reversed(self.layers):
            grad_logits = layer.backward(grad_logits)
        return grad_logits

    def parameters(self):
        """(layer, name) of every learnable array: ``layer.name`` and ``layer.grad_name``."""
        return [(layer, name) for layer in self.layers
                for name in ("weight", "bias") if getattr(layer, name, None) is not None]

    def predict(self, x):
        """Class labels of a batch, or the label of one example."""
        return self(x).argmax(axis=-1)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of a batch's logits, and its gradient with respect to them."""
    shifted = logits - logits.max(axis=1, keepdims=True)  # exp cannot overflow
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    loss = -log_probabilities[rows, labels].mean()
    grad = np.exp(log_probabilities)
    grad[rows, labels] -= 1
    return float(loss), grad / len(labels)


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum, as ``torch.optim.SGD``."""

    def __init__(self, model, lr, momentum=MOMENTUM):
        self.parameters = model.parameters()
        self.lr = lr
        self.momentum = momentum
        self._velocities = [np.zeros_like(getattr(layer, name)) for layer, name in self.parameters]

    def step(self):
        for (layer, name), velocity in zip(self.parameters, self._velocities, strict=True):
            velocity *= self.momentum
            velocity += getattr(layer, "grad_" + name)
            parameter = getattr(layer, name)
            parameter -= self.lr * velocity  # in place: BatchNorm keeps its own arrays


# -------------------------------------------------------------------------- training


@dataclass
class Network:
    """A model in training: its optimizer and its curves (one value per epoch)."""

    name: str
    model: MLP
    optimizer: SGD
    losses: list = field(default_factory=list)
    accuracies: list = field(default_factory=list)
    diverged: bool = field(default=False, init=False)
    _batch_losses: list = field(default_factory=list, init=False, repr=False)

    def step(self, x, labels):
        """One training step on a mini-batch; a diverged network (non-finite loss) stops."""
        if self.diverged:
            return
        loss, grad_logits = softmax_cross_entropy(self.model.train()(x), labels)
        self._batch_losses.append(loss)
        self.diverged = not math.isfinite(loss)
        if not self.diverged:
            self.model.backward(grad_logits)
            self.optimizer.step()

    def end_epoch(self, x_test, labels_test):
        """Record the epoch's mean training loss (NaN once diverged) and the test accuracy."""
        self.losses.append(math.nan if self.diverged else float(np.mean(self._batch_losses)))
        self.accuracies.append(accuracy(self.model, x_test, labels_test))
        self._batch_losses.clear()


def accuracy(model, x, labels):
    """Fraction of x classified as labels, in eval mode (batched)."""
    return float(np.mean(model.eval().predict(x) == labels))


def load_digits(seed, dtype=DTYPE):
    """The digits, split into train and test sets by ``seed``, standardized on the train set.

    Returns x_train, x_test, labels_train, labels_test.
    """
    datasets = _import_extra("sklearn.datasets")
    model_selection = _import_extra("sklearn.model_selection")
    preprocessing = _import_extra("sklearn.preprocessing")
    images, labels = datasets.load_digits(return_X_y=True)
    x_train, x_test, labels_train, labels_test = model_selection.train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    scaler = preprocessing.StandardScaler().fit(x_train)
    return (scaler.transform(x_train).astype(dtype), scaler.transform(x_test).astype(dtype),
            labels_train, labels_test)


def mini_batches(n, rng, batch_size=BATCH_SIZE):
    """Index arrays of the full mini-batches of one epoch over n examples, in a random order.

    The remainder is dropped (a different one each epoch): the statistics of a batch of a
    few examples are too noisy for batch normalization to train on.
    """
    order = rng.permutation(n)
    return [order[start:start + batch_size] for start in range(0, n - batch_size + 1, batch_size)]


def train(networks, data, *, epochs, rng, report):
    """Train ``networks`` side by side on the same mini-batches; ``report(epoch)`` after each.

    A tqdm progress bar follows the mini-batches of each epoch (on a terminal only).
    """
    tqdm = _import_extra("tqdm").tqdm
    x_train, x_test, labels_train, labels_test = data
    for epoch in range(1, epochs + 1):
        batches = mini_batches(len(x_train), rng)
        for indices in tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                            leave=False, disable=None):
            for network in networks:
                network.step(x_train[indices], labels_train[indices])
        for network in networks:
            network.end_epoch(x_test, labels_test)
        report(epoch)


# ------------------------------------------------------------------------- inference


def predict_one_at_a_time(model, x):
    """Eval-mode labels of x's rows, each classified alone as a 1-D array.

    Returns the labels and the time taken per example, in seconds.
    """
    model.eval()
    labels = np.empty(len(x), np.int64)
    started = time.perf_counter()
    for index, example in enumerate(x):
        labels[index] = model.predict(example)
    return labels, (time.perf_counter() - started) / len(x)


def batch_norm_one_at_a_time(model, x, repeats=5):
    """Every eval-mode BatchNorm layer of ``model`` called on one example at a time.

    Each layer gets, one row at a time, the batch it sees in a batched forward pass of x.
    Returns the time per call in seconds (the best of ``repeats`` passes, averaged over the
    layers) and whether every output was bit-identical to the batched call's row.
    """
    model.eval()
    seconds_per_call, identical = [], True
    activations = x
    for layer in model.layers:
        if isinstance(layer, fastbn.BatchNorm):
            rows = list(activations)
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                outputs = [layer(row) for row in rows]
                best = min(best, time.perf_counter() - started)
            seconds_per_call.append(best / len(rows))
            identical &= np.array_equal(np.stack(outputs), layer(activations))
        activations = layer(activations)
    return float(np.mean(seconds_per_call)), identical


# ---------------------------------------------------------------------------- output


def save_plot(networks, path, lr):
    """Training loss and test accuracy per epoch of every run, as a PNG at ``path``."""
    figure_module = _import_extra("matplotlib.figure")
    ticker = _import_extra("matplotlib.ticker")
    # A bare Figure draws with Agg and touches no global pyplot state or backend.
    figure = figure_module.Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for network in networks:
        epochs = range(1, len(network.losses) + 1)
        loss_axes.plot(epochs, network.losses, marker=".", label=network.name)
        accuracy_axes.plot(epochs, [100 * a for a in network.accuracies], marker=".",
                           label=network.name)
    loss_axes.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log",
                  title="Training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"fastbn demo: MLP on scikit-learn digits, SGD lr {lr:g}")
    figure.savefig(path, dpi=100)


def _percent(fraction):
    return f"{100 * fraction:5.1f}%"


def _loss(value):
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.4f}" if value < 1e4 else f"{value:.2e}"


def _verdict(with_bn, without_bn):
    """One honest sentence on the final accuracies (450 test images: 1 point is 4.5 of them)."""
    difference = 100 * (with_bn - without_bn)
    if difference >= 1:
        return (f"batch norm helps at this learning rate: +{difference:.1f} points of test "
                f"accuracy\n(at a low one, such as --lr 0.02, both networks train well)")
    if difference <= -1:
        return (f"batch norm does not help at this learning rate and seed: the network "
                f"without it is {-difference:.1f} points more accurate")
    return "at this learning rate and seed both networks end within 1 point of each other"


# ------------------------------------------------------------------------------- CLI


def add_arguments(parser):
    """Adds ``demo``'s options to an argparse parser (``python -m fastbn demo``)."""
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"training epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"learning rate of SGD (momentum {MOMENTUM}) for both networks "
                             f"(default {DEFAULT_LR})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/test split, initial weights and batch order "
                             "(default 0)")
    parser.add_argument("--no-plot", action="store_true",
                        help=f"do not save the training curves to {PLOT_FILENAME}")


def run(args):
    """Runs the demo with parsed arguments; returns the exit status.

    Nonzero when the batch-norm network misses the accuracy goal or one-at-a-time
    predictions differ from batched ones.
    """
    if args.epochs < 1:
        raise SystemExit("fastbn demo: --epochs must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise SystemExit("fastbn demo: --lr must be a positive number")
    if not 0 <= args.seed < 2**32:  # what scikit-learn's split and NumPy's generators take
        raise SystemExit(f"fastbn demo: --seed must be in [0, 2**32), got {args.seed}")
    started = time.perf_counter()
    _check_extras(plot=not args.no_plot)
    data = load_digits(args.seed)
    x_train, x_test, labels_train, _ = data
    sizes = (x_train.shape[1], *HIDDEN_FEATURES, int(labels_train.max()) + 1)
    networks = []
    for name, batch_norm in (("with BatchNorm", True), ("without BatchNorm", False)):
        model = MLP(sizes, batch_norm=batch_norm, rng=np.random.default_rng(args.seed))
        networks.append(Network(name, model, SGD(model, args.lr)))
    with_bn, without_bn = networks

    print(f"fastbn {fastbn.__version__} demo: scikit-learn digits, {len(x_train)} training and "
          f"{len(x_test)} test images of {x_train.shape[1]} pixels, 10 classes")
    print(f"MLP {' -> '.join(map(str, sizes))}, SGD lr {args.lr:g} momentum {MOMENTUM}, "
          f"batches of {BATCH_SIZE}, {args.epochs} epochs, seed {args.seed}")
    training_started = time.perf_counter()
    _train_with_table(networks, data, epochs=args.epochs, seed=args.seed)
    training_seconds = time.perf_counter() - training_started

    final_bn, final_plain = with_bn.accuracies[-1], without_bn.accuracies[-1]
    print()
    print(f"final test accuracy: {_percent(final_bn).strip()} with BatchNorm, "
          f"{_percent(final_plain).strip()} without"
          + (" (it diverged)" if without_bn.diverged else ""))
    print(_verdict(final_bn, final_plain))
    print(f"trained both networks in {training_seconds:.1f} s")

    print()
    mismatches = _report_one_at_a_time(with_bn.model, x_test)

    if not args.no_plot:
        path = os.path.abspath(PLOT_FILENAME)
        save_plot(networks, path, args.lr)
        print(f"training curves: {path}")

    status = 0
    if final_bn < ACCURACY_GOAL:
        print(f"FAILED: test accuracy with BatchNorm {_percent(final_bn).strip()} is below the "
              f"goal of {100 * ACCURACY_GOAL:.0f}%")
        status = 1
    if mismatches:
        print(f"FAILED: {mismatches} one-at-a-time predictions differ from batched eval")
        status = 1
    print(f"total time {time.perf_counter() - started:.1f} s")
    return status


def _train_with_table(networks, data, *, epochs, seed):
    """:func:`train`, printing a table row per epoch: loss and test accuracy of each run."""
    tqdm = _import_extra("tqdm").tqdm
    print()
    print(f"{'':>5}" + "".join(f"  {network.name:^21}" for network in networks))
    print(f"{'epoch':>5}" + f"  {'train loss':>10}  {'test acc':>9}" * len(networks))

    def report(epoch):
        tqdm.write(f"{epoch:>5}" + "".join(
            f"  {_loss(network.losses[-1]):>10}  {_percent(network.accuracies[-1]):>9}"
            for network in networks
        ))

    # A network may diverge at a high learning rate; that shows in the table as a non-finite
    # loss, not as floating-point warnings on the way there.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        train(networks, data, epochs=epochs, rng=np.random.default_rng(seed), report=report)


def _report_one_at_a_time(model, x):
    """Classify x one example at a time in eval mode and print how it went.

    Returns the number of predictions that differ from batched eval.
    """
    model.eval()
    single, seconds_per_example = predict_one_at_a_time(model, x)
    mismatches = int(np.count_nonzero(single != model.predict(x)))
    bn_seconds, bn_identical = batch_norm_one_at_a_time(model, x)
    print(f"eval mode, one test image at a time (a 1-D array of {x.shape[1]} features):")
    print(f"  predictions: {len(x) - mismatches} of {len(x)} equal batched eval")
    print(f"  latency: {1e6 * seconds_per_example:.1f} µs per example through the whole "
          f"network, {1e6 * bn_seconds:.1f} µs per BatchNorm call")
    identical = "bit-identical" if bn_identical else "NOT bit-identical"
    print(f"  BatchNorm outputs: {identical} to batched eval")
    return mismatches
