// faceverify's reference liveness capture: start a session, show its challenge,
// capture a burst with the camera, verify it against a reference photo.
// Copy it into an app; it needs nothing but a browser and `faceverify web`
// (a gRPC-web gateway) in front of the server. Frames go as the camera sees
// them; only the preview is mirrored, as people expect of a front camera.
"use strict";

// ---- protobuf wire format: just what these messages need --------------------
function varint(n) {
  const out = [];
  while (n > 0x7f) { out.push((n & 0x7f) | 0x80); n = Math.floor(n / 128); }
  out.push(n);
  return out;
}
function field(number, wire, payload) {
  // wire 0: payload is a number (varint); wire 2: payload is bytes
  const key = varint(number * 8 + wire);
  if (wire === 0) return Uint8Array.from([...key, ...varint(payload)]);
  return concat([Uint8Array.from([...key, ...varint(payload.length)]), payload]);
}
function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
const utf8 = (s) => new TextEncoder().encode(s);

// Decodes a message into {field number: [values]}: varints as numbers, 32- and
// 64-bit fields as DataViews, length-delimited ones as bytes (decode them again
// for a nested message).
function decode(bytes) {
  const out = {};
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  const readVarint = () => {
    let n = 0, scale = 1, b;
    do { b = bytes[at++]; n += (b & 0x7f) * scale; scale *= 128; } while (b & 0x80);
    return n;
  };
  while (at < bytes.length) {
    const key = readVarint(), number = Math.floor(key / 8), wire = key & 7;
    let value;
    if (wire === 0) value = readVarint();
    else if (wire === 1) { value = view.getFloat64(at, true); at += 8; }
    else if (wire === 5) { value = view.getFloat32(at, true); at += 4; }
    else if (wire === 2) { const n = readVarint(); value = bytes.subarray(at, at + n); at += n; }
    else throw new Error("unsupported wire type " + wire);
    (out[number] = out[number] || []).push(value);
  }
  return out;
}
const one = (m, n, dflt) => (m[n] ? m[n][0] : dflt);
const text = (b) => new TextDecoder().decode(b || new Uint8Array());

// ---- gRPC-web ---------------------------------------------------------------
const SERVICE = "/faceverify.v1.FaceVerification/";

async function call(method, message) {
  const body = concat([Uint8Array.from([0, ...[24, 16, 8, 0].map((s) => (message.length >>> s) & 255)]),
                       message]);
  const reply = await fetch(SERVICE + method, {
    method: "POST", body,
    headers: {"Content-Type": "application/grpc-web+proto", "X-Grpc-Web": "1"},
  });
  const bytes = new Uint8Array(await reply.arrayBuffer());
  let data = null, status = {"grpc-status": "2", "grpc-message": "no trailers"};
  for (let at = 0; at + 5 <= bytes.length;) {
    const flags = bytes[at];
    const n = new DataView(bytes.buffer, at + 1, 4).getUint32(0);
    const payload = bytes.subarray(at + 5, at + 5 + n);
    at += 5 + n;
    if (flags & 0x80) {
      status = {};
      for (const line of text(payload).split("\r\n")) {
        const i = line.indexOf(":");
        if (i > 0) status[line.slice(0, i).trim()] = line.slice(i + 1).trim();
      }
    } else data = payload;
  }
  if (status["grpc-status"] !== "0") {
    const message = decodeURIComponent(status["grpc-message"] || "");
    throw new Error(`${method}: ${message || "gRPC status " + status["grpc-status"]}`);
  }
  return decode(data || new Uint8Array());
}

const ACTIONS = ["", "LOOK_STRAIGHT", "TURN_LEFT", "TURN_RIGHT", "LOOK_UP", "LOOK_DOWN",
                 "COME_CLOSER"];
const SAY = {LOOK_STRAIGHT: "Look straight at the camera", TURN_LEFT: "Turn your head to your left",
             TURN_RIGHT: "Turn your head to your right", LOOK_UP: "Look up",
             LOOK_DOWN: "Look down", COME_CLOSER: "Bring your face closer"};

async function startLiveness() {
  const m = await call("StartLiveness", new Uint8Array());
  return {
    sessionId: text(one(m, 1)), nonce: one(m, 2, new Uint8Array()),
    challenge: (m[3] || []).map(decode).map((s) => ({action: ACTIONS[one(s, 1, 0)],
                                                      durationMs: one(s, 2, 0)})),
    expiresAt: one(m, 4, 0),
  };
}

async function verifyBurst(session, reference, frames) {
  const capture = concat([
    field(1, 2, utf8(session.sessionId)), field(2, 2, session.nonce),
    ...frames.map((f) => field(3, 2, concat([field(1, 2, f.image),
                                             f.offsetMs ? field(2, 0, f.offsetMs) : new Uint8Array()]))),
  ]);
  const m = await call("Verify", concat([field(2, 2, reference), field(5, 2, capture)]));
  const face = decode(one(m, 4, new Uint8Array()));
  const attack = decode(one(face, 10, new Uint8Array()));
  const live = decode(one(attack, 6, new Uint8Array()));
  return {
    match: !!one(m, 1, 0), score: one(m, 2, 0),
    reasons: (attack[2] || []).map(text),
    liveness: {checked: !!one(live, 1, 0), live: !!one(live, 2, 0), steps: one(live, 3, 0),
               stepsFollowed: one(live, 4, 0), depthScore: one(live, 5, 0),
               sameFaceScore: one(live, 6, 0), matchedFrame: one(live, 7, 0),
               frames: one(live, 8, 0), parallaxScore: one(live, 9, 0)},
  };
}

// ---- the capture ------------------------------------------------------------
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

function grab(video, canvas) {
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise((done) => canvas.toBlob(async (blob) =>
    done(new Uint8Array(await blob.arrayBuffer())), "image/jpeg", 0.9));
}

// One frame during the look at the camera, two during each movement (at these
// shares of the step: the head has arrived by then).
const WHEN = {LOOK_STRAIGHT: [0.6], move: [0.7, 0.95]};

async function captureBurst(video, canvas, challenge, say) {
  const frames = [];
  const first = performance.now();  // offsets count from the first step
  for (const step of challenge) {
    say(SAY[step.action] || step.action, step.action);
    const begun = performance.now();
    for (const share of WHEN[step.action] || WHEN.move) {
      const wait = begun + share * step.durationMs - performance.now();
      if (wait > 0) await sleep(wait);
      const now = performance.now();
      frames.push({image: await grab(video, canvas), offsetMs: Math.round(now - first)});
    }
    const rest = begun + step.durationMs - performance.now();
    if (rest > 0) await sleep(rest);
  }
  return frames;
}

async function run() {
  const $ = (id) => document.getElementById(id);
  const say = (words, action) => { $("say").textContent = words; $("say").dataset.action = action || ""; };
  const show = (state, result) => {
    document.body.dataset.state = state;
    $("result").textContent = JSON.stringify(result, null, 2);
  };
  try {
    $("start").disabled = true;
    const params = new URLSearchParams(location.search);
    let reference;
    if ($("reference").files.length) {
      reference = new Uint8Array(await $("reference").files[0].arrayBuffer());
    } else if (params.get("reference")) {
      reference = new Uint8Array(await (await fetch(params.get("reference"))).arrayBuffer());
    } else throw new Error("choose a reference photo first");
    const session = await startLiveness();
    const video = $("camera");
    video.srcObject = await navigator.mediaDevices.getUserMedia(
      {video: {facingMode: "user", width: 480, height: 640}, audio: false});
    await video.play();
    say("Get ready: face the camera", "");
    await sleep(1000);
    const frames = await captureBurst(video, $("canvas"), session.challenge, say);
    say("Checking…", "");
    video.srcObject.getTracks().forEach((t) => t.stop());
    const result = await verifyBurst(session, reference, frames);
    say(result.liveness.live && result.match ? "Done: verified" : "Not verified", "");
    show("done", {challenge: session.challenge.map((s) => s.action), ...result});
  } catch (e) {
    say("Error: " + e.message, "");
    show("error", {error: e.message});
  } finally {
    $("start").disabled = false;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("start").addEventListener("click", run);
  if (new URLSearchParams(location.search).get("autostart") === "1") run();
});
