"""The labels a request is scored on: the run's class embeddings (computed once) and
extra zero-shot labels (embedded on first use, kept in a bounded LRU cache), and their
scoring through mumic.heads."""

import collections
from typing import Any

from mumic.errors import ServiceError


class LabelBank:
    """Class embeddings v and biases b: the run's labels (computed once) and extra
    zero-shot labels (an LRU cache of at most `capacity` names).

    compute() runs on the model thread; lookups, inserts and scoring happen on the event loop.
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
        """extra_specs(names), refused (422) when the run cannot score extra labels."""
        extra = self.extra_specs(names)
        if self.linear and extra:
            raise ServiceError(422, "this run has a linear head: it scores only its trained labels, not extra labels")
        return extra

    def missing(self, specs: list[Any]) -> list[Any]:
        return [s for s in specs if s.name not in self._lru]

    def put(self, specs: list[Any], v: Any, b: Any) -> None:
        for i, s in enumerate(specs):
            self._lru[s.name] = (v[i], b[i])
            self._lru.move_to_end(s.name)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def get(self, specs: list[Any]) -> tuple[Any, Any]:
        import torch

        vs, bs = [], []
        for s in specs:
            v, b = self._lru[s.name]
            self._lru.move_to_end(s.name)
            vs.append(v)
            bs.append(b)
        return torch.stack(vs), torch.stack(bs)

    def params(self, extra: list[Any]) -> tuple[list[Any], Any, Any]:
        """Specs, [C, D] class embeddings and [C] biases: the run's labels, then `extra`
        (already put in the cache; None, None for a linear head)."""
        specs = list(self.run_specs)
        if self.linear:
            return specs, None, None
        v, b = self.run_v, self.run_b
        if extra:
            import torch

            ev, eb = self.get(extra)
            specs += extra
            v, b = torch.cat([v, ev]), torch.cat([b, eb])
        return specs, v, b

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
