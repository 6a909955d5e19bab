"""Dataset sources: SA-1B tars, JourneyDB, ImageNet class folders, plain folders / webdataset tars, Hugging Face
datasets, and PixArt-alpha's data_info.json layout.

A job config's `source:` section is one of the configs below, chosen by its `kind`; `build_source` turns it into a
Source that lists work units and reads them into RawSamples.
"""
from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from curation.sources.base import RawSample, Rejection, Source, WorkUnit
from curation.sources.folder import FolderConfig, FolderSource
from curation.sources.hf import HFDatasetConfig, HFDatasetSource
from curation.sources.imagenet import ImageNetConfig, ImageNetSource
from curation.sources.journeydb import JourneyDBConfig, JourneyDBSource
from curation.sources.pixart import PixArtConfig, PixArtSource
from curation.sources.sa1b import SA1BConfig, SA1BSource

SourceConfig = Annotated[Union[SA1BConfig, JourneyDBConfig, ImageNetConfig, FolderConfig, HFDatasetConfig,
                               PixArtConfig], Field(discriminator="kind")]


def build_source(config: SA1BConfig | JourneyDBConfig | ImageNetConfig | FolderConfig | HFDatasetConfig
                 | PixArtConfig) -> Source:
    return config.build()


__all__ = ["FolderConfig", "FolderSource", "HFDatasetConfig", "HFDatasetSource", "ImageNetConfig", "ImageNetSource",
           "JourneyDBConfig", "JourneyDBSource", "PixArtConfig", "PixArtSource", "RawSample", "Rejection", "SA1BConfig",
           "SA1BSource", "Source", "SourceConfig", "WorkUnit", "build_source"]
