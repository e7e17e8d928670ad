"""`fruitpipe train`'s settings: which output, features, classifier and validation, the other sources of photos,
the fine-tuning and the augmentation, checked in one place with one-line errors naming the flag to change."""

from __future__ import annotations

from dataclasses import dataclass, field

from fruitpipe import storage
from fruitpipe.classify.augmented import DEFAULT_WEIGHT
from fruitpipe.classify.finetune import FinetuneSettings
from fruitpipe.classify.published import TrainError
from fruitpipe.classify.tuning import require_jax
from fruitpipe.options import option
from fruitpipe.storage import StorageOptions


@dataclass(frozen=True)
class TrainSettings:
    """One `fruitpipe train`: which OUTPUT, which features and classifier, how it is validated, where Spark runs."""

    output: str = option(positional=True, metavar="OUTPUT",
                         help="an OUTPUT written to the end by `fruitpipe run`")
    features: str = option("embeddings", choices=("embeddings", "reduced"),
                           help="full embeddings (default) or OUTPUT's PCA-reduced vectors")
    classifier: str = option(
        "linear", choices=("linear", "logreg", "mlp"),
        help="linear (default): shrinkage LDA or ridge from one pass of statistics summed on the executors, chosen "
             "and calibrated by cross-validation, seconds at any size; logreg / mlp: Spark ML's logistic regression "
             "or one-hidden-layer perceptron (minutes), for comparison")
    folds: int = option(3, help="cross-validation folds on Training (default %(default)s)")
    seed: int = option(7, help="seed of the folds and of a hold-out (default %(default)s)")
    holdout: float = option(0.2, help="share of Training held out as the test set when OUTPUT has no Test split "
                                      "(default %(default)s)")
    compare_pca: bool = option(True, flag="--no-pca-table", negate=True,
                               help="skip the table of top-1 on full embeddings vs PCA at k = 20, 50 and 95 %% "
                                    "variance")
    model_path: str | None = option(None, metavar="FILE",
                                    help="the run's embedding model file, if not the registry's")
    master: str = option("local[*]", help="Spark master URL (default %(default)s)")
    storage: StorageOptions = field(default_factory=StorageOptions)
    spark_conf: dict[str, str] = field(default_factory=dict)
    also: tuple[str, ...] = option(
        (), metavar="OTHER_OUTPUT",
        help="another complete OUTPUT (same embedding model) whose photos join the fit, e.g. your own labelled real "
             "photos embedded by `fruitpipe run`: each of its folders becomes a class of its own that stands for "
             "Fruits-360 classes; cross-validated per source in metrics.json; repeatable")
    also_val: tuple[str, ...] = option(
        (), metavar="VAL_OUTPUT",
        help="a complete OUTPUT of labelled photos taken apart from every photo of the fit (e.g. the val/ of "
             "`fruitpipe sample DIR --real`): never fitted, scored by the final classifier, its figure in "
             "metrics.json `held_out` (the honest real-photo figure); repeatable")
    also_families: str | None = option(
        None, metavar="FILE",
        help="JSON mapping the folders of the --also and --also-val outputs to Fruits-360 classes (DIR/families.json "
             "of `fruitpipe sample DIR --real`); without it their folders must be named as classes")
    augment: int = option(
        0, metavar="N",
        help="also fit on N phone-like variants of each Training photo (the fruit cut from its white background, on "
             "varied scenes, light, blur and JPEG), embedded once and kept under OUTPUT/augmented/; e.g. 4 (default "
             "%(default)s: none; about 1 minute per 1,000 photos and variant per core)")
    augment_weight: float = option(
        DEFAULT_WEIGHT, metavar="W",
        help="weight of a variant against 1 for a photo (default %(default)s: the largest that kept Fruits-360 Test "
             "top-1 at 98 %% on the shared sample)")
    finetune: bool = option(
        False,
        help="then fine-tune the backbone's last blocks with the head on the --also photos and 20 Training photos "
             "per class (JAX on the CPU: pip install 'fruitpipe[finetune]'); the published file is the fine-tuned "
             "one, scored on Test and --also-val like the linear one")
    finetune_epochs: int = option(FinetuneSettings.epochs, metavar="N",
                                  help="passes over the fine-tuning's photos (default %(default)s)")
    finetune_blocks: int = option(
        FinetuneSettings.blocks, metavar="B",
        help="how many of MobileNetV2's last inverted-residual blocks learn, with Conv_1 (1 to 4, default "
             "%(default)s)")
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
