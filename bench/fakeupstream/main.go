// Command fakeupstream is the streaming fake OpenAI upstream used by the
// kubellm benchmark (bench/run.py).
//
// POST /v1/chat/completions with "stream": true answers with OpenAI-style
// server-sent events: a role chunk, -chunks content chunks, a finish chunk,
// a usage chunk (only when "stream_options": {"include_usage": true}) and
// "data: [DONE]". Every event is flushed on its own, like a real upstream.
// Without "stream": true it answers the fixed non-streamed chat.completion
// JSON (the benchmark uses nginx for that, this is only a fallback).
// GET /health answers 200 "ok".
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"time"
)

const (
	completionID = "chatcmpl-bench0000000000000000000001"
	modelName    = "gpt-4o-mini-2024-07-18"
	created      = 1700000000
	promptTokens = 23
)

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatRequest struct {
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options"`
}

type server struct {
	roleEvent   []byte
	tokenEvents [][]byte
	finishEvent []byte
	usageEvent  []byte
	doneEvent   []byte
	jsonBody    []byte
	delay       time.Duration
}

func sse(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return []byte("data: " + string(b) + "\n\n")
}

func chunk(delta map[string]any, finish any) map[string]any {
	return map[string]any{
		"id":                 completionID,
		"object":             "chat.completion.chunk",
		"created":            created,
		"model":              modelName,
		"system_fingerprint": "fp_bench",
		"choices": []any{map[string]any{
			"index":         0,
			"delta":         delta,
			"logprobs":      nil,
			"finish_reason": finish,
		}},
	}
}

func usage(completionTokens int) map[string]any {
	return map[string]any{
		"prompt_tokens":     promptTokens,
		"completion_tokens": completionTokens,
		"total_tokens":      promptTokens + completionTokens,
		"prompt_tokens_details": map[string]any{
			"cached_tokens": 0, "audio_tokens": 0,
		},
		"completion_tokens_details": map[string]any{
			"reasoning_tokens": 0, "audio_tokens": 0,
			"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
		},
	}
}

var words = strings.Fields("Hello ! I am a fake upstream model that streams a fixed answer " +
	"so the router benchmark measures only proxy overhead and nothing else at all .")

func newServer(chunks int, delay time.Duration) *server {
	s := &server{delay: delay, doneEvent: []byte("data: [DONE]\n\n")}
	s.roleEvent = sse(chunk(map[string]any{"role": "assistant", "content": "", "refusal": nil}, nil))
	var text strings.Builder
	for i := 0; i < chunks; i++ {
		tok := words[i%len(words)]
		if i > 0 {
			tok = " " + tok
		}
		text.WriteString(tok)
		s.tokenEvents = append(s.tokenEvents, sse(chunk(map[string]any{"content": tok}, nil)))
	}
	s.finishEvent = sse(chunk(map[string]any{}, "stop"))
	u := chunk(nil, nil)
	u["choices"] = []any{}
	u["usage"] = usage(chunks)
	s.usageEvent = sse(u)
	body, err := json.Marshal(map[string]any{
		"id":      completionID,
		"object":  "chat.completion",
		"created": created,
		"model":   modelName,
		"choices": []any{map[string]any{
			"index": 0,
			"message": map[string]any{
				"role": "assistant", "content": text.String(), "refusal": nil,
			},
			"logprobs":      nil,
			"finish_reason": "stop",
		}},
		"usage":              usage(chunks),
		"service_tier":       "default",
		"system_fingerprint": "fp_bench",
	})
	if err != nil {
		panic(err)
	}
	s.jsonBody = body
	return s
}

func (s *server) chat(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	raw, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	var req chatRequest
	if err := json.Unmarshal(raw, &req); err != nil {
		http.Error(w, `{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}`, http.StatusBadRequest)
		return
	}
	h := w.Header()
	if !req.Stream {
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", fmt.Sprint(len(s.jsonBody)))
		_, _ = w.Write(s.jsonBody)
		return
	}
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	flusher, _ := w.(http.Flusher)
	send := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	if !send(s.roleEvent) {
		return
	}
	for _, ev := range s.tokenEvents {
		if s.delay > 0 {
			time.Sleep(s.delay)
		}
		if !send(ev) {
			return
		}
	}
	if !send(s.finishEvent) {
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !send(s.usageEvent) {
			return
		}
	}
	send(s.doneEvent)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	chunks := flag.Int("chunks", 20, "content chunks per streamed response")
	delay := flag.Duration("delay", 0, "sleep before each content chunk (e.g. 5ms)")
	printJSON := flag.Bool("print-json", false, "print the non-streamed chat.completion body and exit")
	flag.Parse()

	s := newServer(*chunks, *delay)
	if *printJSON {
		fmt.Println(string(s.jsonBody))
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", s.chat)
	mux.HandleFunc("/chat/completions", s.chat)
	mux.HandleFunc("/health", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("fakeupstream listening on http://%s (chunks=%d delay=%s)", ln.Addr(), *chunks, *delay)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 10 * time.Minute}
	log.Fatal(srv.Serve(ln))
}
