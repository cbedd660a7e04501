# Wrong: precision and recall swapped (the row sum, the poems of class c, taken as the predicted
# ones): equal only when the model predicts c as often as c occurs.
def prf(cm: np.ndarray, c: int) -> tuple[float, float, float]:
    tp = cm[c, c]
    predicted, actual = cm[c, :].sum(), cm[:, c].sum()
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)
