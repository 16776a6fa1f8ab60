// Preloaded into Portkey's gateway (`node --require`): it has no bind-address option and
// would listen on every interface, so any listen() without a host gets 127.0.0.1.
"use strict";
const net = require("net");

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    if (args[1] === undefined || args[1] === null || typeof args[1] === "function") {
      args.splice(1, args[1] === undefined || args[1] === null ? 1 : 0, "127.0.0.1");
    }
  } else if (args[0] && typeof args[0] === "object" && args[0].host === undefined) {
    args[0] = { ...args[0], host: "127.0.0.1" };
  }
  return listen.apply(this, args);
};
