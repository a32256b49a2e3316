"""The live training dashboard (`simone monitor`) and `simone status`.

Read-only over run directories (docs/ARCHITECTURE.md). Entry points:

    create_dashboard_app(runs_root=None, run_dir=None, token=None, stall_after_s=60, host="127.0.0.1") -> FastAPI
    serve(runs_root=None, run_dir=None, token=None, host="127.0.0.1", port=5001)
    run_monitor(runs_root, run_dir, host, port, token, say=print)  # `simone monitor`
    start_background_monitor(...) -> BackgroundMonitor (.url)   # `simone run --monitor`
    terminal.status_report(run, runs_root) -> (code, lines)    # `simone status [RUN]`
"""

from simone.monitor.app import create_dashboard_app
from simone.monitor.server import BackgroundMonitor, MonitorError, run_monitor, serve, start_background_monitor

__all__ = [
    "BackgroundMonitor",
    "MonitorError",
    "create_dashboard_app",
    "run_monitor",
    "serve",
    "start_background_monitor",
]
