// Preloaded into a Node server (`node --require tests/localhost_only.cjs ...`) that listens on every interface when
// given only a port, as server-everything's streamable HTTP transport does: a test's server must be reachable on
// 127.0.0.1 only.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const port = args[0];
  if ((typeof port === "number" || (typeof port === "string" && /^\d+$/.test(port))) && typeof args[1] !== "string") {
    args.splice(0, 1, Number(port), "127.0.0.1");
  }
  return listen.apply(this, args);
};
