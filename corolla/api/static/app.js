"use strict";
// The swarm page: polls /api/swarm, draws the servers and the blocks, and (when the page is served by
// `corolla api`) streams chat answers from /v1/chat/completions. No external assets.
const REFRESH_MS = 2000;
let modelId = null;

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function render(data) {
  const online = data.servers.filter(s => s.state === "online" && !s.banned).length;
  document.getElementById("summary").textContent =
    `${data.model} (DHT name ${data.dht_prefix}): ${data.num_blocks} blocks, ${online} of ${data.servers.length} ` +
    `server(s) online` + (data.missing_blocks.length ? `, blocks ${data.missing} served by nobody` : ", every block served");
  const chart = document.getElementById("block-chart");
  chart.replaceChildren();
  const most = Math.max(1, ...data.servers_per_block);
  data.servers_per_block.forEach((count, block) => {
    const col = el("div", {class: "col" + (count === 0 ? " missing" : ""), "data-block": block, "data-servers": count,
                           title: `block ${block}: ${count} server(s)`});
    col.style.height = `${Math.max(4, 100 * count / most)}%`;
    chart.appendChild(col);
  });
  document.getElementById("missing").textContent = data.missing_blocks.length ? `Missing: blocks ${data.missing}` : "";
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const s of data.servers) {
    const row = el("tr", {class: s.state, "data-peer": s.peer_id});
    row.appendChild(el("td", {class: "peer", title: s.peer_id}, "…" + s.peer_id.slice(-10)));
    row.appendChild(el("td", {}, `${s.blocks[0]}:${s.blocks[1]}`));
    const barCell = el("td", {class: "bar-col"});
    const bar = el("div", {class: "bar"});
    const span = el("span");
    span.style.left = `${100 * s.blocks[0] / data.num_blocks}%`;
    span.style.width = `${100 * (s.blocks[1] - s.blocks[0]) / data.num_blocks}%`;
    bar.appendChild(span);
    barCell.appendChild(bar);
    row.appendChild(barCell);
    row.appendChild(el("td", {class: "state"}, s.banned ? `${s.state} (failing)` : s.state));
    row.appendChild(el("td", {}, s.throughput.toFixed(1)));
    row.appendChild(el("td", {}, String(s.cache_tokens_free)));
    row.appendChild(el("td", {}, `${s.dtype}${s.quant === "none" ? "" : " " + s.quant}`));
    row.appendChild(el("td", {}, String(s.version)));
    row.appendChild(el("td", {}, s.rtt_ms === null ? "–" : `${s.rtt_ms.toFixed(1)} ms`));
    body.appendChild(row);
  }
  const models = document.getElementById("models");
  models.replaceChildren(...data.models.map(m => el("li", {}, `${m.name}: ${m.servers} server(s)`)));
}

async function refresh() {
  try {
    const response = await fetch("/api/swarm", {cache: "no-store"});
    if (response.ok) render(await response.json());
    else document.getElementById("summary").textContent = `the swarm could not be read (HTTP ${response.status})`;
  } catch (error) {
    document.getElementById("summary").textContent = `the swarm could not be read: ${error}`;
  }
  setTimeout(refresh, REFRESH_MS);
}

async function setUpChat() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) return;
    modelId = (await response.json()).data[0].id;
  } catch (error) {
    return;  // a page-only server (`corolla health --port`): no chat
  }
  document.getElementById("chat-section").hidden = false;
  const history = [];
  document.getElementById("chat-form").addEventListener("submit", async event => {
    event.preventDefault();
    const input = document.getElementById("chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const log = document.getElementById("chat-log");
    log.appendChild(el("div", {class: "msg user"}, text));
    const answer = el("div", {class: "msg assistant"});
    log.appendChild(answer);
    history.push({role: "user", content: text});
    const send = document.getElementById("chat-send");
    send.disabled = true;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({model: modelId, messages: history, stream: true, max_tokens: 200})});
      if (!response.ok) throw new Error((await response.json()).error.message);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
          if (delta) { answer.textContent += delta; log.scrollTop = log.scrollHeight; }
        }
      }
      history.push({role: "assistant", content: answer.textContent});
    } catch (error) {
      answer.className = "msg error";
      answer.textContent = `error: ${error.message}`;
      history.pop();
    } finally {
      send.disabled = false;
    }
  });
}

refresh();
setUpChat();
