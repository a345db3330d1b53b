"""Data-parallel training with fastbn.distributed.SyncBatchNorm, over MPI.

    pip install "fastbn[mpi]" mpich       # mpi4py, and mpich's mpiexec in this environment
    mpiexec -n 2 python examples/sync_batchnorm.py

Each process (MPI rank) takes its shard of every global batch (the shards need not be
equal) and runs the same small network on it: SyncBatchNorm on the raw features, a hidden
ReLU layer, a softmax output. SyncBatchNorm normalizes with the statistics of the whole
global batch, so every rank computes what one process would on the whole batch. The
linear layers' gradients are summed over the ranks with Allreduce (what PyTorch's
DistributedDataParallel does); SyncBatchNorm's grad_weight and grad_bias already are sums
over all ranks. The ranks' models stay identical, running statistics included.
"""

import numpy as np
from mpi4py import MPI

from fastbn.distributed import SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

FEATURES, HIDDEN, CLASSES = 16, 32, 3
GLOBAL_BATCH, STEPS, LEARNING_RATE = 96, 200, 0.5

# Features with very different offsets and scales: what batch normalization is for.
setup = np.random.default_rng(0)
centres = setup.normal(0.0, 1.0, (CLASSES, FEATURES))
offsets, scales = setup.uniform(-500, 500, FEATURES), setup.uniform(0.01, 100, FEATURES)


def global_batch(seed):
    """A global batch. Every rank can make it here; in practice each reads its own shard."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(CLASSES, size=GLOBAL_BATCH)
    x = (centres[labels] + rng.normal(0.0, 1.0, (GLOBAL_BATCH, FEATURES))) * scales + offsets
    return x.astype(np.float32), labels


def shard(array):
    """This rank's rows: rank r gets a share proportional to r + 1, so shards differ."""
    bounds = np.cumsum([0] + [r + 1 for r in range(size)]) * len(array) // (size * (size + 1) // 2)
    return array[bounds[rank]:bounds[rank + 1]]


def allreduce_sum(array):
    total = np.empty_like(array)
    comm.Allreduce(array, total, op=MPI.SUM)
    return total


# The same initial parameters on every rank (the same seed).
init = np.random.default_rng(1)
bn = SyncBatchNorm(FEATURES, comm=comm)  # float32, channel axis 1, as fastbn.BatchNorm
w1 = (init.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
b1 = np.zeros(HIDDEN, np.float32)
w2 = (init.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32)
b2 = np.zeros(CLASSES, np.float32)


def forward(x):
    z = bn(x)
    hidden = np.maximum(z @ w1 + b1, 0.0)
    logits = hidden @ w2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z, hidden, p / p.sum(axis=1, keepdims=True)


for step in range(STEPS):
    x_all, labels_all = global_batch(seed=step)
    x, labels = shard(x_all), shard(labels_all)  # may be empty: the rank still takes part
    z, hidden, p = forward(x)
    # The loss is the mean cross-entropy over the global batch.
    loss = allreduce_sum(np.array([-np.log(p[np.arange(len(x)), labels]).sum()]))[0]
    grad_logits = p.copy()
    grad_logits[np.arange(len(x)), labels] -= 1.0
    grad_logits /= GLOBAL_BATCH
    grad_w2, grad_b2 = hidden.T @ grad_logits, grad_logits.sum(axis=0)
    grad_hidden = (grad_logits @ w2.T) * (hidden > 0)
    grad_w1, grad_b1 = z.T @ grad_hidden, grad_hidden.sum(axis=0)
    bn.backward(grad_hidden @ w1.T)  # sets bn.grad_weight, bn.grad_bias: global sums
    for parameter, grad in ((w1, grad_w1), (b1, grad_b1), (w2, grad_w2), (b2, grad_b2)):
        parameter -= LEARNING_RATE * allreduce_sum(grad.astype(np.float32))
    bn.weight -= LEARNING_RATE * bn.grad_weight
    bn.bias -= LEARNING_RATE * bn.grad_bias
    if rank == 0 and step % 50 == 0:
        print(f"step {step:3d}: loss {loss / GLOBAL_BATCH:.4f}")

# Eval: the running statistics normalize, with no communication.
bn.eval()
x_all, labels_all = global_batch(seed=10**6)
_, _, p = forward(shard(x_all))
correct = allreduce_sum(np.array([np.sum(p.argmax(axis=1) == shard(labels_all))]))[0]
states = comm.allgather(bn.state_dict())
identical = all(np.array_equal(state[k], states[0][k]) for state in states for k in state)
if rank == 0:
    print(f"{size} ranks, held-out accuracy {correct / GLOBAL_BATCH:.3f}")
    print(f"batch-norm state identical on every rank: {identical}")
    print(f"running_mean[:4] = {bn.running_mean[:4]}")
