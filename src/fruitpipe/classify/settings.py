"""`fruitpipe train`'s settings: which output, features, classifier and validation, the other sources of photos,
the fine-tuning and the augmentation, checked in one place with one-line errors naming the flag to change."""

from __future__ import annotations

from dataclasses import dataclass, field

from fruitpipe import storage
from fruitpipe.classify.augmented import DEFAULT_WEIGHT
from fruitpipe.classify.finetune import FinetuneSettings
from fruitpipe.classify.published import TrainError
from fruitpipe.storage import StorageOptions


@dataclass(frozen=True)
class TrainSettings:
    """One `fruitpipe train`: which OUTPUT, which features and classifier, how it is validated, where Spark runs."""

    output: str
    features: str = "embeddings"
    #: linear (default: the one-pass statistics classifier), or Spark ML's logreg / mlp.
    classifier: str = "linear"
    folds: int = 3
    seed: int = 7
    #: Share of Training held out (stratified) as the test set when OUTPUT has no Test split.
    holdout: float = 0.2
    compare_pca: bool = True
    model_path: str | None = None
    master: str = "local[*]"
    storage: StorageOptions = field(default_factory=StorageOptions)
    spark_conf: dict[str, str] = field(default_factory=dict)
    #: Other outputs whose photos join the fit (--also), e.g. a user's own labelled real photos, and the file
    #: mapping their folders to Fruits-360 classes (--also-families).
    also: tuple[str, ...] = ()
    also_families: str | None = None
    #: Outputs of labelled photos taken apart from every photo of the fit (--also-val, e.g. the real photos' val
    #: split): scored by the final classifier, the honest real-photo figure; never in any fit.
    also_val: tuple[str, ...] = ()
    #: Fine-tune the backbone's last blocks with the head on the fit's photos (--finetune, classify.tuning), starting
    #: from the linear head; the published file is then the fine-tuned one.
    finetune: bool = False
    finetune_epochs: int = FinetuneSettings.epochs
    finetune_blocks: int = FinetuneSettings.blocks
    #: Phone-like variants of each Training photo joining the fit (--augment, classify.augmented), and their weight.
    augment: int = 0
    augment_weight: float = DEFAULT_WEIGHT
    quiet: bool = False

    def finetune_settings(self) -> FinetuneSettings:
        """The fine-tuning's settings, checked."""
        return FinetuneSettings(blocks=self.finetune_blocks, epochs=self.finetune_epochs, seed=self.seed).validate()

    def validate(self) -> TrainSettings:
        """One-line errors naming the flag to change."""
        if self.features not in ("embeddings", "reduced"):
            raise TrainError(f"--features {self.features!r} must be embeddings or reduced")
        if self.classifier not in ("linear", "logreg", "mlp"):
            raise TrainError(f"--classifier {self.classifier!r} must be linear, logreg or mlp")
        if self.folds < 2:
            raise TrainError(f"--folds {self.folds} must be at least 2")
        if not 0 < self.holdout < 1:
            raise TrainError(f"--holdout {self.holdout} must be between 0 and 1 (e.g. 0.2)")
        if self.also and (self.classifier != "linear" or self.features != "embeddings"):
            raise TrainError("--also works with the default --classifier linear on --features embeddings only")
        if self.augment < 0 or self.augment > 32:
            raise TrainError(f"--augment {self.augment} must be between 0 (none) and 32 variants per photo")
        if not 0 < self.augment_weight <= 1:
            raise TrainError(f"--augment-weight {self.augment_weight} must be above 0 and at most 1 (a variant "
                             "never counts more than a photo)")
        if self.augment and (self.classifier != "linear" or self.features != "embeddings"):
            raise TrainError("--augment works with the default --classifier linear on --features embeddings only")
        if self.also_val and (self.classifier != "linear" or self.features != "embeddings"):
            raise TrainError("--also-val works with the default --classifier linear on --features embeddings only")
        names = [storage.normalize(x).rstrip("/") for x in (self.output, *self.also)]
        if any(storage.normalize(v).rstrip("/") in names for v in self.also_val):
            raise TrainError("--also-val names an output the fit learns from (OUTPUT or an --also): pass photos "
                             "taken apart from them")
        if self.finetune:
            from fruitpipe.classify.tuning import require_jax

            self.finetune_settings()
            require_jax()  # before minutes of fitting, not after
            if self.classifier != "linear" or self.features != "embeddings" or not self.also:
                raise TrainError("--finetune learns from real photos with the default --classifier linear on "
                                 "--features embeddings: pass --also OTHER_OUTPUT (your labelled real photos)")
        if self.also_families and not (self.also or self.also_val):
            raise TrainError("--also-families maps the folders of --also and --also-val outputs: pass --also "
                             "OTHER_OUTPUT too")
        if any(storage.normalize(a).rstrip("/") == storage.normalize(self.output).rstrip("/") for a in self.also):
            raise TrainError("--also names the output being trained: pass other outputs")
        return self
