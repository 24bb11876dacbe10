"Shared by the benches: the seconds of one training epoch of a Learner, its validation pass left out."
import time

def train_epoch_seconds(learn) -> float:
    "`learn.fit(1)` with its default callbacks, minus the time of a separate `validate()`: the training pass alone."
    t0 = time.perf_counter()
    with learn.no_logging(): learn.fit(1)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.validate()
    return total - (time.perf_counter() - t0)
