"""Claude API smart router: price-ordered failover for the Claude API as a mitmproxy addon."""
