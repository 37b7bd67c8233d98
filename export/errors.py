"""The one exception type the exporter raises for problems the user can fix."""


class ExportError(Exception):
    """A checkpoint or option we cannot export. The message is meant for the user as is."""
