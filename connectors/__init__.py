"""Sources of items. Every connector implements :class:`connectors.base.Connector`."""

from alflow.connectors.base import (
    Connector,
    FetchReport,
    Record,
    SourceError,
    content_hash,
    normalise_text,
    to_columns,
    to_row,
)


def build_connector(source) -> Connector:
    """The connector for one configured source (an entry of ``sources`` in alflow.toml)."""
    if source.type == "files":
        from alflow.connectors.files import FilesConnector

        return FilesConnector(source)
    if source.type == "wikipedia":
        from alflow.connectors.wikipedia import WikipediaConnector

        return WikipediaConnector(source)
    if source.type == "youtube":
        from alflow.connectors.youtube import YouTubeConnector

        return YouTubeConnector(source)
    if source.type == "google":
        from alflow.connectors.google import GoogleConnector

        return GoogleConnector(source)
    raise SourceError(f"source {source.name}: no connector for type '{source.type}'")


__all__ = [
    "Connector",
    "FetchReport",
    "Record",
    "SourceError",
    "build_connector",
    "content_hash",
    "normalise_text",
    "to_columns",
    "to_row",
]
