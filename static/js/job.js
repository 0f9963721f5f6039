// The job page: draws the loss history, then extends it live from the job's websocket.
(function () {
  "use strict";
  const meta = document.getElementById("job-meta");
  const chart = document.getElementById("loss-chart");
  const figure = JSON.parse(document.getElementById("loss-figure").textContent);
  const finalStatuses = ["succeeded", "failed", "cancelled"];
  const smoothing = figure.smoothing || 0.9;
  let lastStep = Number(meta.dataset.lastStep) || 0;
  let lastEvalStep = Math.max(0, ...figure.data[2].x);
  let smoothed = figure.data[1].y.length ? figure.data[1].y[figure.data[1].y.length - 1] : null;
  let status = meta.dataset.status;
  let points = figure.data[0].x.length;

  Plotly.newPlot(chart, figure.data, figure.layout, { responsive: true, displaylogo: false });
  chart.dataset.points = points;

  function setProgress(step, total) {
    if (total) meta.dataset.total = total;
    const t = Number(meta.dataset.total) || 0;
    document.getElementById("progress-bar").style.width = (t ? Math.min(100, (100 * step) / t) : 0) + "%";
    document.getElementById("progress-text").textContent = "step " + step + " / " + (t || "?");
  }

  function onMetric(m) {
    if (m.train_loss == null || m.step <= lastStep) return; // already drawn
    lastStep = m.step;
    smoothed = smoothed === null ? m.train_loss : smoothing * smoothed + (1 - smoothing) * m.train_loss;
    Plotly.extendTraces(chart, { x: [[m.step], [m.step]], y: [[m.train_loss], [smoothed]] }, [0, 1]);
    points += 1;
    chart.dataset.points = points;
    setProgress(m.step, m.total_steps);
  }

  function onEval(m) {
    if (m.valid_loss == null || m.step <= lastEvalStep) return;
    lastEvalStep = m.step;
    Plotly.extendTraces(chart, { x: [[m.step]], y: [[m.valid_loss]] }, [2]);
  }

  function onEvent(e) {
    const list = document.getElementById("events");
    const item = document.createElement("li");
    item.className = e.level || "info";
    const time = document.createElement("time");
    time.textContent = new Date((e.created_at || Date.now() / 1000) * 1000).toLocaleTimeString();
    item.append(time, " " + e.message);
    list.prepend(item);
  }

  function onStatus(s) {
    status = s.status;
    const badge = document.getElementById("job-status");
    badge.textContent = status;
    badge.className = "badge " + status;
    // The final page shows the new model and other buttons: fetch it once.
    if (finalStatuses.includes(status) || status === "paused") setTimeout(() => location.reload(), 800);
  }

  const handlers = { metric: onMetric, eval: onEval, event: onEvent, status: onStatus,
                     progress: (p) => setProgress(p.step, p.total_steps), checkpoint: () => {} };

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(scheme + "://" + location.host + "/ws/jobs/" + meta.dataset.job + "/");
    // Ask for anything emitted between rendering this page and joining the group.
    socket.onopen = () => socket.send(JSON.stringify({ type: "sync", after_step: lastStep }));
    socket.onmessage = (msg) => {
      const data = JSON.parse(msg.data);
      (handlers[data.type] || (() => {}))(data);
    };
    socket.onclose = () => { if (!finalStatuses.includes(status)) setTimeout(connect, 2000); };
    chart.dataset.socket = "connecting";
    socket.addEventListener("open", () => { chart.dataset.socket = "open"; });
  }

  if (!finalStatuses.includes(status)) connect();
})();
