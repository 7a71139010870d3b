"""The error of a batch job that cannot run or go on; its message names the setting at fault."""


class JobError(RuntimeError):
    """The job cannot run at all, or must stop (unreadable input, output locked by another job,
    output not writable); the message starts with the setting (`job.input`, `job.output`, ...)."""
