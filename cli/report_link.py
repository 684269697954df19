"""``cxr-screen report-link RUN_ID``: a link to a run's report.html for a browser, made when a person
asks for it. On S3 it is presigned and short-lived (default an hour), so that no long-lived bearer
URL is kept anywhere (Prefect's artifacts name the object, not a link); a local report's link is
its file:// URI."""

from __future__ import annotations

import typer

from cli.exits import clean_errors

__all__ = ["report_link"]


def report_link(run_id: str = typer.Argument(..., help="The run whose report to link."),
                results: str = typer.Option("results", "--results", envvar="CXR_RESULTS",
                                            help="Results location (folder or s3://) of the run."),
                minutes: int = typer.Option(60, min=1, max=7 * 24 * 60,
                                            help="How long a presigned link works (S3; at most 7 days).")) -> None:
    """Print a link to a run's report: presigned for --minutes on S3, file:// for a local one."""
    from screening import reports
    from screening.results import ResultsLayout
    from store import storage

    with clean_errors():
        uri = ResultsLayout(storage.join(results)).run(run_id).outputs["report.html"]
        if not storage.exists(uri):
            raise ValueError(f"{uri}: no report there (a run of other results, or one still going)")
        link = reports.shared_link(uri, minutes * 60)
        if link is None:
            raise ValueError(f"{uri}: storage cannot make a link to it (no credentials to sign with?)")
    print(link.href)  # stdout: the link alone, for a script or a browser
    if link.expires_at:
        typer.echo(f"Valid until {link.expires_at}; anyone holding it can read the report until then.", err=True)
