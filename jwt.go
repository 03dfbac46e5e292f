// jwt.go holds the access token: an HS256 JSON Web Token (RFC 7519) that
// signs the user's email, and the session it belongs to, for 30 minutes.
// It is built from crypto/hmac, crypto/sha256 and encoding/base64 rather
// than a library, so that every check a verifier must make is in plain
// sight. It knows nothing of users: the caller decides whether the token's
// subject still exists and its session is still the user's.
//
// A token is three base64url segments joined by dots: a header saying how
// it is signed, the claims, and the HMAC-SHA256 of the first two segments.

package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json/jsontext"
	"encoding/json/v2"
	"errors"
	"fmt"
	"strings"
	"time"
)

const (
	accessTokenLifetime = 30 * time.Minute
	maxTokenBytes       = 8 << 10
	minSecretBytes      = 32 // HMAC-SHA256 wants a key at least as long as its output

	// jwtHeader is the header of every token this server issues.
	jwtHeader = `{"alg":"HS256","typ":"JWT"}`
)

// errInvalidToken is wrapped by every reason a token is refused.
var errInvalidToken = errors.New("invalid token")

// b64 is base64url without padding, strict: trailing bits must be zero, so
// that each token has exactly one spelling.
var b64 = base64.RawURLEncoding.Strict()

// createAccessToken returns a token for email, issued at now and expiring
// 30 minutes later, signed with secret. It carries session, the user's
// current session, in its sid claim: a token is accepted only while the
// user's session is still that one.
func createAccessToken(email, session string, secret []byte, now time.Time) string {
	// A struct of strings and numbers always encodes: no error to check.
	claims, _ := json.Marshal(struct {
		Sub string `json:"sub"`
		Iat int64  `json:"iat"`
		Exp int64  `json:"exp"`
		Sid string `json:"sid"`
	}{email, now.Unix(), now.Add(accessTokenLifetime).Unix(), session})
	signingInput := b64.EncodeToString([]byte(jwtHeader)) + "." + b64.EncodeToString(claims)
	return signingInput + "." + b64.EncodeToString(sign(signingInput, secret))
}

// verifyAccessToken checks token at time now and returns its subject, the
// email it was issued for, and the session it carries. It makes the checks
// of RFC 7519 section 7.2 and RFC 8725; every refusal wraps errInvalidToken.
func verifyAccessToken(token string, secret []byte, now time.Time) (email, session string, err error) {
	if len(token) > maxTokenBytes {
		return "", "", fmt.Errorf("%w: longer than %d bytes", errInvalidToken, maxTokenBytes)
	}
	// The base64 decoder skips CR and LF, so they are refused here; every
	// other byte that is not base64url fails the strict decoding below.
	segs := strings.Split(token, ".")
	if len(segs) != 3 || strings.ContainsAny(token, "\r\n") {
		return "", "", fmt.Errorf("%w: not three base64url segments", errInvalidToken)
	}

	// Typ and Crit are kept as raw JSON, so that null is not taken for absent.
	var header struct {
		Alg  string         `json:"alg"`
		Typ  jsontext.Value `json:"typ"`
		Crit jsontext.Value `json:"crit"`
	}
	if err := decodeSegment(segs[0], &header); err != nil {
		return "", "", fmt.Errorf("%w: header: %w", errInvalidToken, err)
	}
	// Only HS256: a token must not choose its own check ("none", or an
	// algorithm whose key could be confused with ours).
	if header.Alg != "HS256" {
		return "", "", fmt.Errorf("%w: alg is not HS256", errInvalidToken)
	}
	if header.Typ != nil && string(header.Typ) != `"JWT"` {
		return "", "", fmt.Errorf("%w: typ is not JWT", errInvalidToken)
	}
	// crit lists extensions the token says we must understand; we know none.
	if header.Crit != nil {
		return "", "", fmt.Errorf("%w: crit present", errInvalidToken)
	}

	// Over the segments as received, compared in constant time so that the
	// time taken does not tell a forger how much of a signature is right.
	sig, err := b64.DecodeString(segs[2])
	if err != nil || !hmac.Equal(sig, sign(segs[0]+"."+segs[1], secret)) {
		return "", "", fmt.Errorf("%w: bad signature", errInvalidToken)
	}

	// Nbf is kept as raw JSON, so that null is not taken for absent.
	var claims struct {
		Sub string         `json:"sub"`
		Sid string         `json:"sid"`
		Exp *float64       `json:"exp"` // nil if absent or null
		Nbf jsontext.Value `json:"nbf"`
	}
	if err := decodeSegment(segs[1], &claims); err != nil {
		return "", "", fmt.Errorf("%w: claims: %w", errInvalidToken, err)
	}
	nowSeconds := float64(now.UnixNano()) / 1e9 // exp and nbf may have fractions
	if claims.Exp == nil {
		return "", "", fmt.Errorf("%w: exp missing or not a number", errInvalidToken)
	}
	if nowSeconds >= *claims.Exp {
		return "", "", fmt.Errorf("%w: expired", errInvalidToken)
	}
	if claims.Nbf != nil {
		var nbf float64
		if claims.Nbf.Kind() != '0' || json.Unmarshal(claims.Nbf, &nbf) != nil || nbf > nowSeconds {
			return "", "", fmt.Errorf("%w: nbf not a number or in the future", errInvalidToken)
		}
	}
	if claims.Sub == "" {
		return "", "", fmt.Errorf("%w: sub missing or not a non-empty string", errInvalidToken)
	}
	return claims.Sub, claims.Sid, nil
}

// sign returns the HMAC-SHA256 of a token's signing input under secret.
func sign(signingInput string, secret []byte) []byte {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(signingInput))
	return mac.Sum(nil)
}

// decodeSegment decodes a base64url segment that holds one JSON object into
// the struct v points to. encoding/json/v2 matches member names exactly and
// refuses a name given twice, text that is not UTF-8 and anything after the
// value, so that no two readers of one token can disagree about it. (A
// segment that is null or not an object leaves alg or exp missing.)
func decodeSegment(seg string, v any) error {
	data, err := b64.DecodeString(seg)
	if err != nil {
		return fmt.Errorf("base64url: %w", err)
	}
	return json.Unmarshal(data, v)
}
