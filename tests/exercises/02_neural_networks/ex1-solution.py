# Wrong: weights each class's F1 by how often it was *predicted* (a column sum of the confusion
# matrix) instead of its support (a row sum). On a good classifier the two are close, so only an
# exact comparison with scikit-learn on the test set and on random predictions catches it.
def weighted_f1(cm: torch.Tensor) -> float:
    """Support-weighted mean of the per-class F1 scores of a confusion matrix."""
    cm = cm.double()
    tp, predicted, support = cm.diag(), cm.sum(dim=0), cm.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted, 0.0)
    recall = torch.where(support > 0, tp / support, 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return (f1 * predicted / predicted.sum()).sum().item()
