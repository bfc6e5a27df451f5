"""The labels a request is scored on: the run's class embeddings (computed once) and
zero-shot labels (embedded on first use, kept in a bounded LRU cache), and their
scoring through mumic.heads."""

import collections
from typing import Any

from mumic.errors import ServiceError


class LabelBank:
    """Class embeddings v and biases b: the run's labels (computed once) and extra
    zero-shot labels (an LRU cache of at most `capacity` names).

    compute() runs on the text thread; lookups, inserts and scoring happen on the event loop.
    """

    # the run's own labels: [C, D] class embeddings and [C] biases; None with a linear head
    run_v: Any
    run_b: Any

    def __init__(self, model: Any, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        self.linear = not model.zero_shot
        # a linear head scores only its trained labels
        self.run_specs = list(model.seen) if self.linear else list(model.labels)
        self.run_names = [s.name for s in self.run_specs]
        self.run_v, self.run_b = (None, None) if self.linear else self.compute(self.run_specs)
        self.inv_tau = model.inv_tau.detach().float().cpu()
        self._lru: collections.OrderedDict[str, tuple[Any, Any]] = collections.OrderedDict()

    def compute(self, specs: list[Any]) -> tuple[Any, Any]:
        """([C, D] normalised class embeddings, [C] biases); leaves the model's own text
        cache empty so that memory stays bounded by the LRU."""
        import torch

        with torch.inference_mode():
            v = self.model.class_embeddings(specs).float().cpu()
            b = self.model.label_biases(specs).detach().float().cpu()
        self.model.clear_text_cache()
        return v, b

    def extra_specs(self, names: list[str]) -> list[Any]:
        """Specs of the requested names that are not already scored run labels."""
        run = set(self.run_names)
        return self.model.resolve_labels([n for n in names if n not in run])

    def requested(self, names: list[str]) -> list[Any]:
        """Specs of exactly `names`, in their order: the run's own labels as trained, other
        names zero-shot (from the prompt templates); refused (422) when the run cannot
        score zero-shot labels."""
        extra = self.extra_specs(names)
        if self.linear and extra:
            raise ServiceError(422, "this run has a linear head: it scores only its trained labels (GET /labels), not zero-shot ones")
        run = dict(zip(self.run_names, self.run_specs))
        built = iter(extra)
        return [run[n] if n in run else next(built) for n in names]

    def missing(self, specs: list[Any]) -> list[Any]:
        """The zero-shot specs among `specs` whose embeddings are not cached."""
        run = set(self.run_names)
        return [s for s in specs if s.name not in run and s.name not in self._lru]

    def put(self, specs: list[Any], v: Any, b: Any) -> None:
        for i, s in enumerate(specs):
            self._lru[s.name] = (v[i], b[i])
            self._lru.move_to_end(s.name)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def known_rows(self, specs: list[Any]) -> dict[str, tuple[Any, Any]]:
        """name -> (class embedding, bias) of the specs whose rows are at hand: the run's
        labels and the cached zero-shot ones (marked as recently used). Taken before any
        wait, so that other requests filling the cache meanwhile cannot evict them."""
        rows = {}
        index = {n: i for i, n in enumerate(self.run_names)}
        for s in specs:
            if s.name in index and not self.linear:
                rows[s.name] = (self.run_v[index[s.name]], self.run_b[index[s.name]])
            elif s.name in self._lru:
                self._lru.move_to_end(s.name)
                rows[s.name] = self._lru[s.name]
        return rows

    def params(self, specs: list[Any], rows: dict[str, tuple[Any, Any]]) -> tuple[list[Any], Any, Any]:
        """specs, [C, D] class embeddings and [C] biases of `specs` from `rows` (name ->
        (v, b)); None, None for a linear head, which scores from its classifier."""
        if self.linear:
            return specs, None, None
        import torch

        return specs, torch.stack([rows[s.name][0] for s in specs]), torch.stack([rows[s.name][1] for s in specs])

    def probabilities(self, u_raw: Any, specs: list[Any], v: Any, b: Any) -> Any:
        """[N, C] label probabilities (numpy) of unnormalised image embeddings u_raw [N, D]
        for params() (specs, v, b): the tempered sigmoid, or the linear head's sigmoid."""
        import torch

        from mumic import heads

        with torch.inference_mode():
            if self.linear:
                model = self.model
                return torch.sigmoid(model.logits(u_raw.to(model.device), specs).float()).cpu().numpy()
            return heads.tempered_probabilities(u_raw, v, self.inv_tau, b).numpy()

    def decide(self, probs: Any, specs: list[Any], calibrated: bool) -> Any:
        """[N, C] booleans: at the run's calibrated thresholds, or at 0.5."""
        return self.model.decide(probs, specs) if calibrated else probs >= 0.5

    def __len__(self) -> int:
        return len(self._lru)
