"""`strop ui`: a local web dashboard over the runs folder (FastAPI + server-rendered HTML + a little
hand-written JavaScript; no build step, nothing fetched from the network).

- `runs`: every run folder read into a table row and a run page (report, live curves, config, data
  summary, evaluation samples, checkpoints); status from the files a run leaves and the jobs started here.
- `jobs`: runs started from the page as `strop train` child processes; stop (SIGTERM: a checkpoint) and
  resume (`strop train --resume`).
- `form`: the start form built from the config schema; validation is `load_config`'s, data findings
  are `strop data check`'s.
- `playground`: chat through `strop serve`'s OpenAI-compatible app; predict and score through the API.
- `app` / `server`: the routes, the token check, the socket.
Layer: above the public API (`strop.api`), below the CLI.
"""
