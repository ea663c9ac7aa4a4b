"""Head selection: strict max-logit rule, the paper's looser rule, avg and oracle heads (MASS_SPEC step 7)."""

from __future__ import annotations

import torch

from mass_exp.routing.heads import paper_rule_correct, score_predictions, select_prediction, strict_correct

# Sample j uses the one-hot embedding e_j, so column j of each head holds sample j's logits.
# columns:                 s0     s1     s2     s3     s4
HEAD0 = torch.tensor([[0.1, 0.1, -0.3, 0.40, 0.0],
                      [0.5, 0.5, -0.2, 0.00, 0.0]])  # 2 classes
HEAD1 = torch.tensor([[0.2, 0.0, 0.0, 0.35, 0.1],
                      [0.9, 0.0, 0.0, 0.35, 0.2],
                      [0.3, 0.0, 0.0, 0.35, 0.9]])  # 3 classes
HEAD2 = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0],
                      [0.0, 0.1, 0.0, 0.0, 0.0]])  # 2 classes
HEADS = {0: HEAD0, 1: HEAD1, 2: HEAD2}
EMB = torch.eye(5)
SETS = [(0, 1), (0, 2), (0,), (0, 1), (1,)]
TRUE = torch.tensor([0, 0, 1, 1, 0])
LABELS = torch.tensor([1, 1, 2, 0, 0])


def test_strict_max_logit_rule():
    task, cls = select_prediction(EMB, HEADS, SETS, head_selection="max")
    # s0: task1/class1 (0.9) beats task0/class1 (0.5): class index matches the label, task is wrong
    # s1: tie 0.5 between task0/class1 and task2/class0 -> lower task index wins
    # s3: head0 max 0.40 > head1 max 0.35 -> task 0
    # s4: full argmax of head1 is class 2
    assert task.tolist() == [1, 0, 0, 0, 1]
    assert cls.tolist() == [1, 1, 1, 0, 2]
    assert strict_correct(task, cls, TRUE, LABELS).tolist() == [False, True, False, False, False]


def test_paper_rule_is_looser():
    got = paper_rule_correct(EMB, HEADS, SETS, TRUE, LABELS, head_selection="max")
    # s0: wrong head, same index -> counted correct
    # s2: head0 logits [-0.3, -0.2] zero-padded to the true task's 3 classes -> argmax 2 == label
    # s3: head0 [0.4, 0.0] padded -> argmax 0 == label, though the head is wrong
    # s4: head1 trimmed to 2 classes [0.1, 0.2] -> argmax 1 != 0
    assert got.tolist() == [True, True, True, True, False]


def test_avg_head_selection():
    task, cls = select_prediction(EMB, HEADS, SETS, head_selection="avg")
    # s3: head1 mean 0.35 > head0 mean 0.20 -> task 1, all logits tied -> class 0
    # s1: means tie at 0.3 -> task 0
    assert task.tolist() == [1, 0, 0, 1, 1]
    assert cls.tolist() == [1, 1, 1, 0, 2]
    assert strict_correct(task, cls, TRUE, LABELS).tolist() == [False, True, False, True, False]
    assert paper_rule_correct(EMB, HEADS, SETS, TRUE, LABELS, head_selection="avg").tolist() == [
        True, True, True, True, False
    ]


def test_oracle_head():
    task, cls = select_prediction(EMB, HEADS, SETS, oracle_tasks=TRUE)
    assert task.tolist() == TRUE.tolist()
    assert cls.tolist() == [1, 1, 0, 0, 0]  # s3: head1 all tied -> class 0; s2: head1 column all 0 -> 0
    assert strict_correct(task, cls, TRUE, LABELS).tolist() == [True, True, False, True, True]


def test_single_task_sets_equal_plain_argmax():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    heads = {t: 100 * torch.nn.functional.normalize(torch.randn(5 + t, 8, generator=g), dim=-1) for t in range(3)}
    true = torch.randint(0, 3, (20,), generator=g)
    task, cls = select_prediction(emb, heads, [(int(t),) for t in true])
    assert task.tolist() == true.tolist()
    assert cls.tolist() == [int((emb[i] @ heads[int(t)].T).argmax()) for i, t in enumerate(true)]


def test_heads_as_list_and_score_predictions():
    heads_list = [HEAD0, HEAD1, HEAD2]
    out = score_predictions(EMB, heads_list, SETS, TRUE, LABELS)
    assert out["pred_task"].tolist() == [1, 0, 0, 0, 1]
    assert out["correct"].tolist() == [False, True, False, False, False]
    assert out["correct_paper_rule"].tolist() == [True, True, True, True, False]
    oracle = score_predictions(EMB, heads_list, SETS, TRUE, LABELS, oracle_head=True)
    assert oracle["correct"].tolist() == [True, True, False, True, True]
    # 2-class true task: trimming the 3-class head never changes the oracle answer
    assert oracle["correct_paper_rule"].tolist() == oracle["correct"].tolist()
