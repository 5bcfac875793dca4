"""One error type for bad input: it names the file, record and position, and says what to do."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a record in it, a coordinate). The CLI turns it into exit code 2."""

    def __init__(self, message: str, *, path=None, record=None, position=None, hint: str | None = None):
        self.path, self.record, self.position, self.hint = path, record, position, hint
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record!r}")
        if position is not None:
            where.append(f"position {position}")
        text = (": ".join([", ".join(where), message]) if where else message)
        if hint:
            text += f" ({hint})"
        super().__init__(text)
