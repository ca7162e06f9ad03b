# fleet-twin: the headless twin (`serve`), `watch`, `chaos`, `predict` and the console (`tui`).
# Not built in CI. Build: docker build -t fleet-twin .   Run: see compose.yaml.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY twin ./twin
COPY tui ./tui
COPY fleets ./fleets
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TERM=xterm-256color \
    COLORTERM=truecolor
COPY --from=build /wheels /wheels
RUN python -m pip install /wheels/*.whl && rm -rf /wheels \
 && groupadd --system --gid 10001 twin \
 && useradd --system --uid 10001 --gid twin --home-dir /home/twin --create-home \
      --shell /usr/sbin/nologin twin
USER twin:twin
WORKDIR /home/twin
ENTRYPOINT ["fleet-twin"]
CMD ["serve", "all-vendors", "--broker", "mqtt://mosquitto:1883"]
