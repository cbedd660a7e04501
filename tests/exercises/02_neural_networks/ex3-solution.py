# Wrong: counts a tie with the best score as an improvement (>= instead of >), so a plateau resets
# the patience and moves best_epoch to the last of the tied epochs. The exercise asks for a strict
# improvement and the first best epoch on ties.
def early_stopping(val_scores: list[float], patience: int) -> tuple[int, int]:
    """(best epoch, epoch at which training stops) for a patience-based early-stopping rule."""
    if not val_scores:
        raise ValueError("val_scores is empty: pass at least one epoch's score")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    best, best_epoch, waited = float("-inf"), 0, 0
    for epoch, score in enumerate(val_scores):
        if score >= best:
            best, best_epoch, waited = score, epoch, 0
        else:
            waited += 1
            if waited >= patience:
                return best_epoch, epoch
    return best_epoch, len(val_scores) - 1


best_epoch, stop_epoch = early_stopping(history["val_acc"], patience=3)
print(f"main model, patience 3: best epoch {best_epoch}, would stop at epoch {stop_epoch} "
      f"(of 0..{len(history['val_acc']) - 1})")
