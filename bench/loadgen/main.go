// Command loadgen is the HTTP/1.1 keep-alive load generator of the kubellm
// benchmark (bench/run.py).
//
// It opens -c persistent connections and sends the same POST on each, one
// request at a time per connection (closed loop), either for -warmup then
// -d (duration mode) or -n requests in total (count mode). It speaks
// HTTP/1.1 itself (Content-Length and chunked bodies) so that the client
// costs little CPU and the time to first byte of a streamed body is exact.
//
// It prints one JSON object: request and error counts, requests per second,
// latency percentiles (full response) and, with -stream, time-to-first-byte
// percentiles, where TTFB is the time from writing the request until the
// first body bytes holding "data:" are read.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type sample struct {
	start time.Time
	end   time.Time
	lat   time.Duration
	ttfb  time.Duration
}

type workerStats struct {
	samples      []sample
	errors       int64
	reconnects   int64
	usageMissing int64
	firstErr     string
}

type report struct {
	Mode         string  `json:"mode"`
	URL          string  `json:"url"`
	Concurrency  int     `json:"concurrency"`
	Stream       bool    `json:"stream"`
	Requests     int     `json:"requests"`
	Errors       int64   `json:"errors"`
	Reconnects   int64   `json:"reconnects"`
	UsageMissing int64   `json:"stream_usage_missing"`
	DurationS    float64 `json:"duration_s"`
	RPS          float64 `json:"rps"`
	LatMeanMs    float64 `json:"lat_mean_ms"`
	LatP50Ms     float64 `json:"lat_p50_ms"`
	LatP90Ms     float64 `json:"lat_p90_ms"`
	LatP99Ms     float64 `json:"lat_p99_ms"`
	LatMaxMs     float64 `json:"lat_max_ms"`
	TTFBP50Ms    float64 `json:"ttfb_p50_ms"`
	TTFBP90Ms    float64 `json:"ttfb_p90_ms"`
	TTFBP99Ms    float64 `json:"ttfb_p99_ms"`
	FirstError   string  `json:"first_error,omitempty"`
}

var (
	dataMarker  = []byte("data:")
	doneMarker  = []byte("data: [DONE]")
	usageMarker = []byte(`"completion_tokens"`)
	choicesKey  = []byte(`"choices"`)
)

type conn struct {
	addr    string
	timeout time.Duration
	c       net.Conn
	br      *bufio.Reader
	body    []byte
	buf     []byte
}

func (c *conn) close() {
	if c.c != nil {
		_ = c.c.Close()
		c.c = nil
	}
}

func (c *conn) dial() error {
	nc, err := net.DialTimeout("tcp", c.addr, c.timeout)
	if err != nil {
		return err
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	c.c = nc
	c.br = bufio.NewReaderSize(nc, 64<<10)
	return nil
}

// line reads one CRLF-terminated line without the terminator.
func (c *conn) line() ([]byte, error) {
	l, err := c.br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	return bytes.TrimRight(l, "\r\n"), nil
}

// do sends one request and reads the whole response. It returns the time of
// the first body read that holds "data:" (zero if none) and whether the
// server asked to close the connection.
func (c *conn) do(req []byte, stream bool) (ttfbAt time.Time, keep bool, err error) {
	if c.c == nil {
		if err = c.dial(); err != nil {
			return
		}
	}
	_ = c.c.SetDeadline(time.Now().Add(c.timeout))
	if _, err = c.c.Write(req); err != nil {
		return
	}
	status, err := c.line()
	if err != nil {
		return
	}
	parts := strings.SplitN(string(status), " ", 3)
	if len(parts) < 2 || !strings.HasPrefix(parts[0], "HTTP/1.") {
		err = fmt.Errorf("bad status line %q", status)
		return
	}
	code, _ := strconv.Atoi(parts[1])
	keep = parts[0] == "HTTP/1.1"
	contentLength := int64(-1)
	chunked := false
	for {
		var h []byte
		if h, err = c.line(); err != nil {
			return
		}
		if len(h) == 0 {
			break
		}
		k, v, ok := bytes.Cut(h, []byte(":"))
		if !ok {
			continue
		}
		v = bytes.TrimSpace(v)
		switch strings.ToLower(string(k)) {
		case "content-length":
			contentLength, _ = strconv.ParseInt(string(v), 10, 64)
		case "transfer-encoding":
			chunked = bytes.Contains(bytes.ToLower(v), []byte("chunked"))
		case "connection":
			lv := strings.ToLower(string(v))
			if strings.Contains(lv, "close") {
				keep = false
			} else if strings.Contains(lv, "keep-alive") {
				keep = true
			}
		}
	}
	c.body = c.body[:0]
	found := false
	appendBody := func(b []byte) {
		c.body = append(c.body, b...)
		if stream && !found && bytes.Contains(c.body, dataMarker) {
			found = true
			ttfbAt = time.Now()
		}
	}
	switch {
	case chunked:
		for {
			var l []byte
			if l, err = c.line(); err != nil {
				return
			}
			if i := bytes.IndexByte(l, ';'); i >= 0 {
				l = l[:i]
			}
			var n uint64
			if n, err = strconv.ParseUint(string(bytes.TrimSpace(l)), 16, 32); err != nil {
				err = fmt.Errorf("bad chunk size %q", l)
				return
			}
			if n == 0 {
				for { // trailers
					var t []byte
					if t, err = c.line(); err != nil {
						return
					}
					if len(t) == 0 {
						break
					}
				}
				break
			}
			if cap(c.buf) < int(n)+2 {
				c.buf = make([]byte, int(n)+2)
			}
			b := c.buf[:n+2]
			if _, err = io.ReadFull(c.br, b); err != nil {
				return
			}
			appendBody(b[:n])
		}
	case contentLength >= 0:
		remaining := contentLength
		for remaining > 0 {
			if cap(c.buf) < 64<<10 {
				c.buf = make([]byte, 64<<10)
			}
			b := c.buf[:cap(c.buf)]
			if int64(len(b)) > remaining {
				b = b[:remaining]
			}
			var n int
			n, err = c.br.Read(b)
			if n > 0 {
				appendBody(b[:n])
				remaining -= int64(n)
			}
			if err != nil {
				return
			}
		}
	default: // body until EOF
		keep = false
		if cap(c.buf) < 64<<10 {
			c.buf = make([]byte, 64<<10)
		}
		for {
			var n int
			n, err = c.br.Read(c.buf[:cap(c.buf)])
			if n > 0 {
				appendBody(c.buf[:n])
			}
			if err == io.EOF {
				err = nil
				break
			}
			if err != nil {
				return
			}
		}
	}
	if code != 200 {
		snippet := c.body
		if len(snippet) > 300 {
			snippet = snippet[:300]
		}
		err = fmt.Errorf("HTTP %d: %s", code, snippet)
		return
	}
	if stream {
		if !bytes.Contains(c.body, doneMarker) {
			err = errors.New("stream ended without data: [DONE]")
		}
	} else if !bytes.Contains(c.body, choicesKey) {
		err = errors.New(`response body has no "choices"`)
	}
	return
}

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	idx := int(math.Ceil(p*float64(len(sorted)))) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return float64(sorted[idx]) / 1e6
}

func buildRequest(u *url.URL, body []byte, headers []string) []byte {
	path := u.RequestURI()
	var b bytes.Buffer
	fmt.Fprintf(&b, "POST %s HTTP/1.1\r\nHost: %s\r\n", path, u.Host)
	b.WriteString("User-Agent: kubellm-bench-loadgen\r\nAccept: */*\r\nContent-Type: application/json\r\n")
	for _, h := range headers {
		b.WriteString(h)
		b.WriteString("\r\n")
	}
	fmt.Fprintf(&b, "Content-Length: %d\r\n\r\n", len(body))
	b.Write(body)
	return b.Bytes()
}

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	target := flag.String("url", "", "target URL, e.g. http://127.0.0.1:8080/v1/chat/completions")
	bodyArg := flag.String("body", "", "request body (JSON); @file reads it from a file")
	stream := flag.Bool("stream", false, "expect an SSE response; measure TTFB and require data: [DONE]")
	conc := flag.Int("c", 1, "concurrent connections")
	dur := flag.Duration("d", 10*time.Second, "measured duration (duration mode)")
	warmup := flag.Duration("warmup", 2*time.Second, "unmeasured warmup before -d (duration mode)")
	total := flag.Int("n", 0, "send exactly this many requests in total instead of -d (count mode)")
	timeout := flag.Duration("timeout", 30*time.Second, "per-request timeout")
	var headers headerList
	flag.Var(&headers, "H", "extra request header 'Name: value' (repeatable)")
	flag.Parse()

	u, err := url.Parse(*target)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -url must be an http:// URL")
		os.Exit(2)
	}
	body := []byte(*bodyArg)
	if strings.HasPrefix(*bodyArg, "@") {
		if body, err = os.ReadFile((*bodyArg)[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", err)
			os.Exit(2)
		}
	}
	if *conc < 1 {
		*conc = 1
	}
	req := buildRequest(u, body, headers)

	countMode := *total > 0
	var remaining atomic.Int64
	remaining.Store(int64(*total))
	begin := time.Now()
	measureStart := begin.Add(*warmup)
	end := measureStart.Add(*dur)
	if countMode {
		measureStart = begin
	}

	stats := make([]*workerStats, *conc)
	var wg sync.WaitGroup
	for w := 0; w < *conc; w++ {
		ws := &workerStats{}
		if countMode {
			ws.samples = make([]sample, 0, *total / *conc + 1)
		} else {
			ws.samples = make([]sample, 0, 4096)
		}
		stats[w] = ws
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &conn{addr: u.Host, timeout: *timeout}
			defer c.close()
			for {
				if countMode {
					if remaining.Add(-1) < 0 {
						return
					}
				} else if !time.Now().Before(end) {
					return
				}
				hadConn := c.c != nil
				t0 := time.Now()
				ttfbAt, keep, err := c.do(req, *stream)
				t1 := time.Now()
				if err != nil {
					ws.errors++
					if ws.firstErr == "" {
						ws.firstErr = err.Error()
					}
					c.close()
					time.Sleep(time.Millisecond)
					continue
				}
				if hadConn && !keep {
					ws.reconnects++
				}
				if !keep {
					c.close()
				}
				if *stream && !bytes.Contains(c.body, usageMarker) {
					ws.usageMissing++
				}
				// Keep every request that finished after the warmup: RPS counts
				// the completions inside [measureStart, end], latencies cover
				// them plus those still in flight at the end.
				if !t1.Before(measureStart) {
					s := sample{start: t0, end: t1, lat: t1.Sub(t0)}
					if !ttfbAt.IsZero() {
						s.ttfb = ttfbAt.Sub(t0)
					}
					ws.samples = append(ws.samples, s)
				}
			}
		}()
	}
	wg.Wait()
	finished := time.Now()

	rep := report{URL: *target, Concurrency: *conc, Stream: *stream}
	var lats, ttfbs []time.Duration
	var sum time.Duration
	inWindow := 0
	for _, ws := range stats {
		rep.Errors += ws.errors
		rep.Reconnects += ws.reconnects
		rep.UsageMissing += ws.usageMissing
		if rep.FirstError == "" {
			rep.FirstError = ws.firstErr
		}
		for _, s := range ws.samples {
			lats = append(lats, s.lat)
			sum += s.lat
			if s.ttfb > 0 {
				ttfbs = append(ttfbs, s.ttfb)
			}
			if !s.end.After(end) {
				inWindow++
			}
		}
	}
	if countMode {
		rep.Mode = "count"
		rep.DurationS = finished.Sub(begin).Seconds()
		rep.RPS = float64(len(lats)) / rep.DurationS
	} else {
		rep.Mode = "duration"
		rep.DurationS = end.Sub(measureStart).Seconds()
		rep.RPS = float64(inWindow) / rep.DurationS
	}
	rep.Requests = len(lats)
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	sort.Slice(ttfbs, func(i, j int) bool { return ttfbs[i] < ttfbs[j] })
	if len(lats) > 0 {
		rep.LatMeanMs = float64(sum) / float64(len(lats)) / 1e6
		rep.LatMaxMs = float64(lats[len(lats)-1]) / 1e6
	}
	rep.LatP50Ms = percentile(lats, 0.50)
	rep.LatP90Ms = percentile(lats, 0.90)
	rep.LatP99Ms = percentile(lats, 0.99)
	rep.TTFBP50Ms = percentile(ttfbs, 0.50)
	rep.TTFBP90Ms = percentile(ttfbs, 0.90)
	rep.TTFBP99Ms = percentile(ttfbs, 0.99)
	out, _ := json.Marshal(rep)
	fmt.Println(string(out))
}
