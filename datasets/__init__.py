"""Built-in dataset readers, registered as the ``datasets`` plugin."""

from prismkit.core.hookspecs import hookimpl
from prismkit.datasets.easyvqa import EasyVQA, EasyVQACaptions
from prismkit.datasets.readers import CocoCaptions, ImageFolderCaptions, VQAv2, WebDatasetCaptions
from prismkit.datasets.stream import WebDatasetStream

BUILTIN_DATASETS = (
    CocoCaptions,
    VQAv2,
    ImageFolderCaptions,
    WebDatasetCaptions,
    WebDatasetStream,
    EasyVQA,
    EasyVQACaptions,
)


@hookimpl
def register_datasets(register) -> None:
    for cls in BUILTIN_DATASETS:
        register(cls)
