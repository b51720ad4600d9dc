"""ConfusionMatrix metrics against a brute-force per-pixel computation."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.metrics import ConfusionMatrix

IGNORE = 255


def brute_force_metrics(pred, target, num_classes):
    """Count per class with plain Python loops over pixels, then apply the textbook definitions."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    total = correct = 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t == IGNORE:
            continue
        total += 1
        if p == t:
            tp[t] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[t] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    present = [c for c in range(num_classes) if tp[c] + fp[c] + fn[c]]
    in_truth = [c for c in range(num_classes) if tp[c] + fn[c]]
    return {
        "miou": sum(iou[c] for c in present) / len(present),
        "pixel_acc": correct / total,
        "mean_acc": sum(tp[c] / (tp[c] + fn[c]) for c in in_truth) / len(in_truth),
        "fwiou": sum((tp[c] + fn[c]) / total * iou[c] for c in in_truth),
        "per_class_iou": iou,
    }


def random_case(seed, num_classes=6, shape=(3, 7, 9)):
    g = torch.Generator().manual_seed(seed)
    # Classes 0..3 appear; class 4 only in predictions; class 5 nowhere (must be excluded from the mean).
    target = torch.randint(0, 4, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.15] = IGNORE
    pred = torch.randint(0, 5, shape, generator=g)
    return pred, target


def assert_matches(result, expected):
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    for got, want in zip(result["per_class_iou"], expected["per_class_iou"]):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed):
    pred, target = random_case(seed)
    matrix = ConfusionMatrix(6)
    matrix.update(pred[:2], target[:2])  # accumulate over two batches, as over a split
    matrix.update(pred[2:], target[2:])
    result = matrix.compute()
    expected = brute_force_metrics(pred, target, 6)
    assert_matches(result, expected)
    assert math.isnan(result["per_class_iou"][5])  # absent from both: excluded
    assert result["per_class_iou"][4] == 0.0  # predicted but never true: counts as IoU 0


def test_logits_are_argmaxed_and_ignore_pixels_skipped():
    pred, target = random_case(7, num_classes=5)
    logits = torch.nn.functional.one_hot(pred, 6).permute(0, 3, 1, 2).float()
    a, b = ConfusionMatrix(6), ConfusionMatrix(6)
    a.update(logits, target)
    b.update(pred, target)
    assert torch.equal(a.mat, b.mat)
    assert a.mat.sum() == (target != IGNORE).sum()


def test_perfect_prediction_and_out_of_range_labels():
    target = torch.tensor([[0, 1], [2, IGNORE]])
    matrix = ConfusionMatrix(3)
    matrix.update(target.clamp(max=2), target)
    assert matrix.compute()["miou"] == 1.0
    with pytest.raises(ValueError, match=r"\[7\]"):
        matrix.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[7, 0]]))


def _all_reduce_worker(rank, world_size, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    pred, target = random_case(11, shape=(4, 5, 6))
    matrix = ConfusionMatrix(6)
    matrix.update(pred[rank::world_size], target[rank::world_size])  # each process sees half the batch
    matrix.all_reduce()
    queue.put((rank, matrix.mat))
    dist.destroy_process_group()


def test_all_reduce_over_two_processes_equals_whole_split(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = tmp_path / "init"
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, 2, str(init_file), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    pred, target = random_case(11, shape=(4, 5, 6))
    whole = ConfusionMatrix(6)
    whole.update(pred, target)
    assert torch.equal(results[0], whole.mat) and torch.equal(results[1], whole.mat)
