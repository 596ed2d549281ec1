// The viewer's browser side: label, depth, connection, algorithm, opacity and raw/overlay switches are
// drawn here, on the viewer's <canvas>, from the analyzed sample's maps (sent once per sample by
// ui.viewer_data), with no round trip to the server. The drawing is ui.pictures' (torch's bilinear
// resize, scaling by the maximum, the jet lookup table, alpha blending) so the page shows the server's
// picture to within rounding. Other visualizers arrive as finished pictures and are copied onto it.
window.camscopeViewer = (() => {
  let parsed = { text: null, data: null, cache: new Map() };

  const bytes = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

  const payload = (text) => {
    if (text !== parsed.text) {
      let data = null;
      try { data = text ? JSON.parse(text) : null; } catch (error) { data = null; }
      if (data && data.lut) data.lutBytes = bytes(data.lut);
      parsed = { text, data, cache: new Map() };
    }
    return parsed.data;
  };

  // torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of an (h, w, c) array
  const axis = (inSize, outSize) => {
    const scale = inSize / outSize, lo = new Int32Array(outSize), hi = new Int32Array(outSize),
      t = new Float32Array(outSize);
    for (let o = 0; o < outSize; o++) {
      const s = Math.max(scale * (o + 0.5) - 0.5, 0), i = Math.floor(s);
      lo[o] = i; hi[o] = i < inSize - 1 ? i + 1 : i; t[o] = s - i;
    }
    return { lo, hi, t };
  };
  const resize = (src, h, w, c, outH, outW) => {
    const ys = axis(h, outH), xs = axis(w, outW), out = new Float32Array(outH * outW * c);
    for (let y = 0; y < outH; y++) {
      const r0 = ys.lo[y] * w, r1 = ys.hi[y] * w, ty = ys.t[y];
      for (let x = 0; x < outW; x++) {
        const x0 = xs.lo[x], x1 = xs.hi[x], tx = xs.t[x];
        for (let k = 0; k < c; k++) {
          const top = (1 - tx) * src[(r0 + x0) * c + k] + tx * src[(r0 + x1) * c + k];
          const bottom = (1 - tx) * src[(r1 + x0) * c + k] + tx * src[(r1 + x1) * c + k];
          out[(y * outW + x) * c + k] = (1 - ty) * top + ty * bottom;
        }
      }
    }
    return out;
  };

  // colorize(normalize(upsample(heat, (outH, outW)))) as RGBA bytes
  const coloured = (data, heat, outH, outW) => {
    const [h, w, text] = heat, up = resize(bytes(text), h, w, 1, outH, outW);
    let peak = 0;
    for (const v of up) if (v > peak) peak = v;
    const rgba = new Uint8ClampedArray(outH * outW * 4), lut = data.lutBytes;
    for (let i = 0; i < up.length; i++) {
      const index = peak > 0 ? Math.round(Math.min(Math.max(up[i] / peak, 0), 1) * 255) : 0;
      rgba[4 * i] = lut[3 * index]; rgba[4 * i + 1] = lut[3 * index + 1]; rgba[4 * i + 2] = lut[3 * index + 2];
      rgba[4 * i + 3] = 255;
    }
    return rgba;
  };

  const blend = (rgba, base, alpha) => {  // base: RGB values per pixel (or one grey level)
    for (let i = 0, p = 0; i < rgba.length; i += 4, p += 3) {
      for (let k = 0; k < 3; k++) {
        const under = typeof base === "number" ? base : base[p + k];
        rgba[i + k] = Math.round((1 - alpha) * under + alpha * rgba[i + k]);
      }
    }
    return rgba;
  };

  const sheet = (rgba, height, width, draw) => {  // an off-screen canvas holding one picture
    const canvas = document.createElement("canvas");
    canvas.width = width; canvas.height = height;
    const context = canvas.getContext("2d");
    context.putImageData(new ImageData(rgba, width, height), 0, 0);
    if (draw) draw(context);
    return canvas;
  };

  const decoded = (src, then) => {  // a server picture (data URL) on an off-screen canvas, when loaded
    const image = new Image();
    image.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
      canvas.getContext("2d").drawImage(image, 0, 0);
      then(canvas);
    };
    image.src = src;
  };

  const enlarged = (image, size) => {  // ui.pictures.enlarge: scaled up (never down) to ~size on the long side
    const [h, w, text] = image, factor = size / Math.max(h, w), rgb = bytes(text);
    if (factor <= 1) return { h, w, rgb };
    const outH = Math.round(h * factor), outW = Math.round(w * factor);
    return { h: outH, w: outW, rgb: resize(rgb, h, w, 3, outH, outW).map((v) => Math.round(v)) };
  };

  const signalLines = (signal, height, width, sizes) => (context) => {
    const colours = sizes.signal_colours;
    if (!signal) return;
    let low = Infinity, high = -Infinity;
    for (const row of signal) for (const v of row) { if (v < low) low = v; if (v > high) high = v; }
    const span = high > low ? high - low : 1, margin = sizes.signal_margin;
    context.lineWidth = 2;
    signal.forEach((row, channel) => {
      const colour = colours[channel % colours.length];
      context.strokeStyle = `rgb(${colour.join(",")})`;
      context.beginPath();
      row.forEach((v, i) => {
        const x = row.length > 1 ? (i * (width - 1)) / (row.length - 1) : 0;
        const y = margin + (1 - (v - low) / span) * (height - 2 * margin);
        if (i === 0) context.moveTo(x, y); else context.lineTo(x, y);
      });
      context.stroke();
    });
  };

  const picture = (data, connection, heat, raw, opacity) => {
    const sizes = data.sizes, oneD = heat[0] === 1 && heat[1] > 1;
    if (raw) {
      const [h, w] = oneD ? sizes.strip : [sizes.view, sizes.view];
      return sheet(coloured(data, heat, h, w), h, w);
    }
    if (oneD) {
      const [h, w] = sizes.signal, alpha = Math.max(opacity, sizes.signal_min_alpha);
      return sheet(blend(coloured(data, heat, h, w), 255, alpha), h, w,
        signalLines(connection.signal, h, w, sizes));
    }
    if (connection.image && !connection.base) connection.base = enlarged(connection.image, sizes.view);
    const base = connection.image ? connection.base : null;
    const h = base ? base.h : sizes.view, w = base ? base.w : sizes.view;
    return sheet(blend(coloured(data, heat, h, w), base ? base.rgb : 0, opacity), h, w);
  };

  const escape = (text) => text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const inline = (markdown) => escape(markdown).replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");

  // The picture (an off-screen canvas, or null while a server picture decodes) and info line for the
  // controller's values; null when this payload cannot draw them (another visualizer is on its way).
  const choose = (data, visualizer, label, connectionName, mode, depth, algorithm, opacity, redraw) => {
    if (!data.visualizers.includes(visualizer)) return null;
    const connection = data.connections[connectionName];
    if (!connection) return null;
    if (data.kind === "picture") {
      const shown = connection.picture;
      if (!shown.canvas && !shown.loading) {
        shown.loading = true;
        decoded(shown.src, (canvas) => { shown.canvas = canvas; redraw(); });
      }
      return shown;
    }
    const steps = connection.steps, n = steps.length;
    const position = mode === data.custom ? Math.min(Math.max(Math.round(Number(depth)) || 1, 1), n)
      : connection.default;
    const key = [connectionName, algorithm, position, label].join("|");
    const cached = parsed.cache.get(key + "|" + visualizer + "|" + opacity);
    if (cached) return cached;
    const step = steps[position - 1], heat = step && data.maps[[connectionName, algorithm, step, label].join("|")];
    let shown;
    if (!heat) {
      const name = data.labels[label] ?? String(label), title = data.titles[algorithm] ?? algorithm;
      const [h, w, level] = data.blank;
      shown = { canvas: sheet(new Uint8ClampedArray(h * w * 4), h, w, (context) => {
        context.fillStyle = `rgb(${level},${level},${level})`; context.fillRect(0, 0, w, h);
      }), info: `no ${title} map for label '${name}' on '${connectionName}'` };
    } else {
      shown = { canvas: picture(data, connection, heat, visualizer === data.raw, Number(opacity)), info: data.info[key] };
    }
    if (parsed.cache.size > 64) parsed.cache.clear();
    parsed.cache.set(key + "|" + visualizer + "|" + opacity, shown);
    return shown;
  };

  // Draw the viewer (Gradio event js: the payload text and the controller's values). The canvas's
  // data-choice names what it shows once drawn (tests and the switch benchmark wait for it).
  let drawn = 0, latest = null;
  const render = (text, visualizer, label, connection, mode, depth, algorithm, opacity) => {
    const data = payload(text);
    const canvas = document.querySelector("#viewer-image canvas"), info = document.querySelector("#layer-info");
    if (!data || !canvas) return;
    const asked = latest = [text.length, visualizer, label, connection, mode, depth, algorithm, opacity].join("|");
    const redraw = () => {  // a server picture finished decoding: draw it if it is still the one asked for
      if (latest === asked) render(text, visualizer, label, connection, mode, depth, algorithm, opacity);
    };
    const shown = choose(data, visualizer, label, connection, mode, depth, algorithm, opacity, redraw);
    if (!shown || !shown.canvas) return;
    if (canvas.width !== shown.canvas.width || canvas.height !== shown.canvas.height) {
      canvas.width = shown.canvas.width; canvas.height = shown.canvas.height;
    }
    canvas.getContext("2d").drawImage(shown.canvas, 0, 0);
    canvas.dataset.choice = [visualizer, label, connection, mode, depth, algorithm, opacity, ++drawn].join("|");
    if (info) info.innerHTML = inline(shown.info || "");
  };

  // The depth step a connection opens on (its default), for the slider after a connection switch.
  const defaultPosition = (text, connection) => {
    const data = payload(text), found = data && data.connections[connection];
    return found ? found.default : 1;
  };

  // Forget the pictures drawn so far (the switch benchmark times every switch from scratch).
  const forget = () => parsed.cache.clear();

  return { render, defaultPosition, forget };
})();
