// The population scatter's browser side: Gradio draws the Plotly figure; this hooks its events.
// A click writes the sample id into the hidden #population-click field, a box/lasso selection writes
// the ids into #population-selection (the server reacts to their "input" events); hovering shows a
// thumbnail of the sample beside Plotly's tooltip when the project has images.
(() => {
  const send = (id, value) => {
    const field = document.querySelector(`#${id} textarea, #${id} input`);
    if (!field) return;
    field.value = value;
    field.dispatchEvent(new Event("input", { bubbles: true }));
  };
  const tip = document.createElement("img");
  tip.id = "population-thumbnail";
  tip.style.cssText = "position:fixed;z-index:1000;pointer-events:none;display:none;border:1px solid #999;" +
    "background:white;max-width:192px;max-height:96px;image-rendering:pixelated";
  const hook = (plot) => {
    if (plot.camscopeHooked || typeof plot.on !== "function") return;
    plot.camscopeHooked = true;
    plot.on("plotly_click", (event) => {
      const point = event.points && event.points[0];
      if (point && point.customdata) send("population-click", `${point.customdata[0]}|${Date.now()}`);
    });
    plot.on("plotly_selected", (event) => {
      if (!event || !event.points) return;
      const ids = event.points.filter((p) => p.customdata).map((p) => p.customdata[0]);
      send("population-selection", `${ids.join(",")}|${Date.now()}`);
    });
    plot.on("plotly_hover", (event) => {
      const meta = (plot.layout && plot.layout.meta) || {};
      const point = event.points && event.points[0];
      if (!meta.thumbnails || !point || !point.customdata) return;
      if (!tip.isConnected) document.body.appendChild(tip);
      tip.src = `${meta.thumbnails}?slice=${encodeURIComponent(meta.slice)}&sample_id=${encodeURIComponent(point.customdata[0])}`;
      const mouse = event.event || {};
      tip.style.left = `${(mouse.clientX || 0) + 18}px`;
      tip.style.top = `${(mouse.clientY || 0) + 18}px`;
      tip.style.display = "block";
    });
    plot.on("plotly_unhover", () => { tip.style.display = "none"; });
  };
  const scan = () => document.querySelectorAll("#population .js-plotly-plot").forEach(hook);
  new MutationObserver(scan).observe(document.documentElement, { childList: true, subtree: true });
  scan();
})();
