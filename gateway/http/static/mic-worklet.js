// The microphone, as 16-bit PCM mono at `rate`, posted to the page in frames of `frameMs`.
// It runs at the AudioContext's rate: where the browser would not give the context the rate
// asked for (Firefox refuses to mix a microphone at another rate), it averages the input down
// to `rate` (a box filter: enough against aliasing for speech recognition).
class Pcm16Frames extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { rate = sampleRate, frameMs = 40 } = options.processorOptions || {};
    this.step = sampleRate / rate; // input samples per output sample
    this.frame = new Int16Array(Math.round((rate * frameMs) / 1000));
    this.n = 0;
    this.sum = 0;
    this.count = 0;
    this.phase = 0;
    this.port.onmessage = (e) => {
      if (e.data === "flush") {
        this.post();
        this.port.postMessage("flushed");
      }
    };
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.frame[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    if (this.n === this.frame.length) this.post();
  }

  post() {
    if (!this.n) return;
    const out = this.frame.slice(0, this.n);
    this.n = 0;
    this.port.postMessage(out.buffer, [out.buffer]);
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0]; // mono: the node downmixes (channelCount 1)
    if (!input) return true;
    if (this.step === 1) {
      for (let i = 0; i < input.length; i++) this.push(input[i]);
      return true;
    }
    for (let i = 0; i < input.length; i++) {
      this.sum += input[i];
      this.count++;
      if (++this.phase >= this.step) {
        this.phase -= this.step;
        this.push(this.sum / this.count);
        this.sum = 0;
        this.count = 0;
      }
    }
    return true;
  }
}

registerProcessor("libra-pcm16", Pcm16Frames);
