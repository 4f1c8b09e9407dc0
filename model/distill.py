"""Dense distillation (``yolov1-train --distill-dense W``): a Darknet teacher's class scores at
every cell of the student's grid, read from the teacher's own output layers.

With ``--cache-views`` the student's frozen layers ``0..L`` are cached per view. When those are
the teacher's own layers, the teacher's ``[yolo]`` output that needs nothing before layer ``L``
(Yolo-Fastest-XL's stride-32 scale: layers 99..115 on layer 98) costs a few layers a step on the
same cached tensor: no extra teacher pass, no extra cache. Each of its predictions has a centre,
an objectness and class probabilities; a student cell's target is the objectness-weighted mean
of the class probabilities of the predictions centred in it, weighted by their largest
objectness (how sure the teacher is that something is there). ``YOLOv1Loss.dense_term`` applies
it to the cells that hold no target object, where the paper's loss says nothing about classes;
object cells keep their ground-truth (or teacher-box) class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.darknet import DarknetNetwork, Route, Shortcut, Yolo, decode_yolo


def reachable_output(network: DarknetNetwork, start: int) -> int:
    """The first ``[yolo]`` layer whose inputs, from layer ``start`` on, need no layer before
    ``start - 1``; ``ValueError`` when there is none."""
    for out in network.output_layers:
        if not isinstance(network.layers[out], Yolo) or out < start:
            continue
        ok = True
        for index in range(start, out + 1):
            layer = network.layers[index]
            sources = layer.layers if isinstance(layer, Route) else []
            sources = [layer.source] if isinstance(layer, Shortcut) else sources
            ok = ok and all(i >= start - 1 for i in sources)
        if ok:
            return out
    raise ValueError(f"no [yolo] output of the teacher can run from layer {start}")


def same_prefix(student: DarknetNetwork, teacher: DarknetNetwork, upto: int) -> bool:
    """Whether layers ``0..upto`` of the two networks hold the same tensors (False when
    either has fewer layers)."""
    if min(len(student.layers), len(teacher.layers)) <= upto:
        return False
    for a, b in zip(student.layers[: upto + 1], teacher.layers[: upto + 1], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys():
            return False
        if not all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k].to(sa[k])) for k in sa):
            return False
    return True


def cell_class_targets(
    centres: torch.Tensor, objectness: torch.Tensor, class_probs: torch.Tensor, S: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell of an S x S grid: the objectness-weighted mean class distribution of the
    predictions centred in it, and their largest objectness.

    Args:
        centres: (N, M, 2) x, y in [0, 1] of the image.
        objectness: (N, M) in [0, 1].
        class_probs: (N, M, C).
    Returns:
        ``q`` (N, S, S, C) and ``w`` (N, S, S); a cell with no prediction gets q = 0, w = 0.
    """
    N, M, C = class_probs.shape
    col = (centres[..., 0] * S).floor().long().clamp(0, S - 1)
    row = (centres[..., 1] * S).floor().long().clamp(0, S - 1)
    cell = row * S + col  # (N, M)
    mass = torch.zeros(N, S * S, C, dtype=class_probs.dtype, device=class_probs.device)
    mass.scatter_add_(1, cell[..., None].expand(N, M, C), objectness[..., None] * class_probs)
    total = torch.zeros(N, S * S, dtype=objectness.dtype, device=objectness.device)
    total.scatter_add_(1, cell, objectness)
    weight = torch.zeros_like(total).scatter_reduce_(1, cell, objectness, "amax")
    q = mass / total.clamp_min(1e-12)[..., None]
    return q.view(N, S, S, C), weight.view(N, S, S)


class DenseTeacher:
    """A Darknet teacher's output scale that runs on the student's cached layer ``start - 1``.

    ``teacher_to_student[t]`` is the student class of teacher class ``t`` (-1: none), as
    ``model.teacher.class_mapping`` gives it.
    """

    def __init__(
        self,
        network: DarknetNetwork,
        start: int,
        teacher_to_student: Sequence[int],
        S: int,
        name: str = "",
    ):
        self.name = name  # for logs and the checkpoint's metadata: the teacher's cfg
        self.network = network.eval()
        self.start = start
        self.output = reachable_output(network, start)
        self.S = S
        C = max(teacher_to_student) + 1
        index = [0] * C
        for t, s in enumerate(teacher_to_student):
            if s >= 0:
                index[s] = t
        self.index = torch.tensor(index)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` (N, S, S, C) in the student's class order and ``w`` (N, S, S)."""
        raw = self.network(features, start=self.start, upto=self.output)
        boxes, objectness, class_probs = decode_yolo(self.network, raw, layers=[self.output])
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # the box sizes are not used
        probs = class_probs.index_select(-1, self.index.to(class_probs.device))
        return cell_class_targets(centres, objectness, probs, self.S)


def mix_dense(terms: Sequence[torch.Tensor | None], side_share: float) -> torch.Tensor:
    """The dense term of a student on one backbone (``terms = [first]``) or two (``[first,
    side]``, None where no teacher has that backbone's layers, never both): the side's term
    weighs ``side_share``, the first's the rest; a missing term leaves the other whole."""
    present = [t for t in terms if t is not None]
    if not present:
        raise ValueError("mix_dense needs at least one dense term")
    if len(present) == 1:
        return present[0]
    first, side = terms
    return torch.lerp(first, side, side_share)


def boxed_targets(
    q: torch.Tensor, w: torch.Tensor, cells: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense targets ``q`` (N, S, S, C) and weights ``w`` (N, S, S), with the cells that
    lie in a target box (``cells`` (N, S, S) >= 0: ``model.data.label_cells``) set to that
    box's class, one-hot, at weight 1. ``cells`` None: unchanged."""
    if cells is None:
        return q, w
    inside = cells >= 0
    one_hot = torch.nn.functional.one_hot(cells.clamp(min=0), q.shape[-1]).to(q)
    return torch.where(inside[..., None], one_hot, q), torch.where(inside, torch.ones_like(w), w)
